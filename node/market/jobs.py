"""The client side of the market: one JobManager per node runs every job this node submits.

Theory of operation
-------------------
``submit`` stages the inputs under ``DATA_DIR/jobs/<id>/``, records the job in SQLite and starts a task:

1. find candidates (signed, unexpired capacity ads that fit the resources; this node too if it provides);
2. ask up to ``k`` of them for quotes in parallel (counter-offers happen inside each negotiation machine);
3. rank the acceptable offers (cost, trust, latency), accept the best, withdraw from the rest;
4. run the job stream: JobSpec, inputs, live logs, JobResult, outputs (digest-checked), Receipt (verified and
   countersigned), then store the receipt and mark the job completed.

A provider that dies, stalls (no heartbeat), refuses, or sends a bad digest or a wrong receipt ends that attempt;
the job goes to the next candidate with the same job id (at-least-once), up to ``max_attempts``. Every attempt is
recorded, so a job that ran twice says so. A job nobody takes fails with the reasons of every candidate.
A completed run is then checked by replicas when its provider is not trusted enough yet (node/market/verify.py).
After a restart, unfinished jobs are resumed from the start (their attempts history shows the restart).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from node import net
from node.market import wire
from node.market.provider import ProviderService
from node.market.queue import DEFAULT_MAX_ACTIVE, DEFAULT_MAX_UNFINISHED, JobQueue, SlotWaiters
from node.market.receipts import quote_request, receipt_problem
from node.market.requests import SubmitRequest, new_job_id, sha256_file
from node.market.transfer import DigestMismatch, receive_file, send_file
from node.market.verify import ResultDisputed, Run, Verifier
from node.market.wire import ChannelClosed, FrameChannel, Messenger, StreamChannel, loopback_pair
from node.reputation.service import ReputationService
from node.store import JobRow, Store
from protocol import codec
from protocol.cosign import sign_as, terms_hash
from protocol.errors import RemoteProtocolError
from protocol.identity import Identity
from protocol.market import (
    JOB_PROTOCOL_ID,
    NEGOTIATE_PROTOCOL_ID,
    NEUTRAL_TRUST,
    Offer,
    explain_failures,
    rank_offers,
    resource_class,
)
from protocol.messages import (
    Agreement,
    Chunk,
    ChunkKind,
    FileRef,
    JobAccepted,
    JobResult,
    JobSpec,
    Outcome,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    RejectCode,
)
from protocol.negotiation import ClientNegotiation, Completed, Failed, Quoted, Send
from protocol.verification import REFUSE_BELOW, VERIFY_BELOW

log = logging.getLogger(__name__)

DEFAULT_K: Final = 5
MAX_ATTEMPTS: Final = 3
NEGOTIATION_TIMEOUT_S: Final = 10.0
STALL_TIMEOUT_S: Final = 15.0  # several provider heartbeats missed
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
DISCOVERY_PATIENCE_S: Final = 20.0  # how long a job waits for a first fitting provider to appear
DISCOVERY_RETRY_S: Final = 1.0
BUSY_PATIENCE_S: Final = 600.0  # how long a job queues while every fitting provider is busy
BUSY_RETRY_MAX_S: Final = 5.0
# Reasons that make a job wait and ask again rather than fail: a provider that is busy (up to BUSY_PATIENCE_S), or
# one too loaded (or restarting) to answer a quote in time (within the discovery window only).
WAIT_FOR: Final = frozenset({RejectCode.BUSY, RejectCode.TIMEOUT})


class AttemptFailed(Exception):
    """This provider did not deliver (died, stalled, refused, lied). The job moves on to the next candidate."""


def base_job_id(wire_id: str) -> str:
    """The job a wire id belongs to: verification replicas run as ``<job id>-v<n>``."""
    return re.sub(r"-v\d+$", "", wire_id)


@dataclass
class _Pending:
    provider: str
    machine: ClientNegotiation
    channel: FrameChannel
    quote: Quote
    cost: int
    latency_ms: float


Finder = Callable[[dict[str, Any]], Awaitable[list[str]]]


class JobManager:
    def __init__(
        self,
        *,
        identity: Identity,
        messenger: Messenger,
        store: Store,
        host: net.NetHost,
        find_providers: Finder,
        provider: ProviderService | None,
        jobs_dir: Path,
        clock_ms: Callable[[], int],
        k: int = DEFAULT_K,
        max_attempts: int = MAX_ATTEMPTS,
        trust: Callable[[str], float] = lambda peer: NEUTRAL_TRUST,
        reputation: ReputationService | None = None,
        verify_below: float = VERIFY_BELOW,
        refuse_below: float = REFUSE_BELOW,
        replicas: int = 2,
        discovery_patience_s: float = DISCOVERY_PATIENCE_S,
        busy_patience_s: float = BUSY_PATIENCE_S,
        max_unfinished: int = DEFAULT_MAX_UNFINISHED,
        max_active: int = DEFAULT_MAX_ACTIVE,
    ) -> None:
        self.identity = identity
        self.messenger = messenger
        self.store = store
        self.host = host
        self.find_providers = find_providers
        self.provider = provider
        self.jobs_dir = jobs_dir
        self.clock_ms = clock_ms
        self.k = k
        self.max_attempts = max_attempts
        self.reputation = reputation
        self.trust = reputation.trust if reputation is not None else trust
        self.refuse_below = refuse_below
        self.verifier = Verifier(replicate=self._replicate, rate=self._rate, trust=self.trust, jobs_dir=jobs_dir,
                                 verify_below=verify_below, replicas=replicas)  # fmt: skip
        self.discovery_patience_s = discovery_patience_s
        self.busy_patience_s = busy_patience_s
        self.queue = JobQueue(max_unfinished=max_unfinished, max_active=max_active)
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # the task of each unfinished job
        self._cancelling: set[str] = set()  # jobs the user cancelled whose task has not ended yet
        self._changed: dict[str, trio.Event] = {}
        self._slot_waiters = SlotWaiters()  # jobs waiting for a busy provider; each run of ours that ends wakes one
        # Providers one of this node's jobs is negotiating with right now: another job of ours leaves them alone
        # until that negotiation ends, so our own jobs never bid against each other for one free slot.
        self._negotiating: set[str] = set()
        self._negotiation_ended = trio.Event()
        self._wanting = 0  # our jobs in _negotiate now (asking, or waiting for a provider to ask)
        self._running_on: collections.Counter[str] = collections.Counter()  # our runs in progress, per provider
        # Metrics hooks (node.metrics), set by the daemon: a quote's round trip in ms; a job that just ended.
        self.on_quote_latency: Callable[[float], None] | None = None
        self.on_job_ended: Callable[[JobRow], None] | None = None

    # ------------------------------------------------------------------------------------------- service

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until cancelled; first resume what a previous run of this node left unfinished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            now = self.clock_ms()
            for row in self.store.unfinished_jobs("provider"):
                self.store.update_job(row.job_id, "provider", now_ms=now, state="failed",
                                      error="this node restarted while running the job; it was killed")  # fmt: skip
                for attempt in self.store.attempts(row.job_id, "provider"):
                    if attempt.ended_ms is None:
                        self.store.end_attempt(row.job_id, attempt.attempt, outcome="failed", now_ms=now,
                                               role="provider", reason="this node restarted")  # fmt: skip
            for row in self.store.unfinished_jobs("client"):
                self._end_open_attempts(row.job_id, "interrupted", "this node restarted during the attempt")
                self.store.update_job(row.job_id, "client", now_ms=now, state="queued",
                                      error="resumed after this node restarted")  # fmt: skip
                self.queue.admit(row.job_id, resumed=True)
                self._start(row.job_id)
            task_status.started()
            await trio.sleep_forever()

    def _start(self, job_id: str) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._scopes[job_id] = scope
        self._nursery.start_soon(self._run_job, job_id, scope)

    def _set(self, job_id: str, **fields: Any) -> None:
        current = self.store.get_job(job_id, "client")
        if current is not None and current.state in TERMINAL:
            return  # an ended job stays ended
        row = self.store.update_job(job_id, "client", now_ms=self.clock_ms(), **fields)
        if self.on_job_ended is not None and row.state in TERMINAL:
            self.on_job_ended(row)
        self._changed.pop(job_id, trio.Event()).set()

    # ------------------------------------------------------------------------------------------- API

    async def submit(self, request: SubmitRequest) -> str:
        job_id = request.job_id or new_job_id()
        if self.store.get_job(job_id, "client") is not None:
            raise ValueError(f"job {job_id} already exists")
        self.queue.admit(job_id)  # QueueFull: too many unfinished jobs already
        try:
            return self._stage_and_start(job_id, request)
        except BaseException:
            self.queue.done(job_id)
            raise

    def _stage_and_start(self, job_id: str, request: SubmitRequest) -> str:
        job_dir = self.jobs_dir / job_id
        inputs_dir = job_dir / "inputs"
        inputs_dir.mkdir(parents=True)
        refs = []
        for source in request.inputs:
            dest = inputs_dir / source.name
            if source.path is not None:
                shutil.copyfile(source.path, dest)
            else:
                dest.write_bytes(source.data or b"")
            refs.append({"name": source.name, "sha256": sha256_file(dest), "size": dest.stat().st_size})
        record = request.to_json() | {"inputs": refs, "env": request.env}
        self.store.create_job(job_id=job_id, role="client", state="queued", now_ms=self.clock_ms(),
                              client=self.identity.peer_id, request=record)  # fmt: skip
        self._start(job_id)
        return job_id

    async def wait(self, job_id: str, *, seconds: float) -> None:
        """Return when the job is terminal or ``seconds`` passed."""
        with trio.move_on_after(seconds):
            while True:
                row = self.store.get_job(job_id, "client")
                if row is None or row.state in TERMINAL:
                    return
                await self._changed.setdefault(job_id, trio.Event()).wait()

    async def changed(self, job_id: str) -> None:
        await self._changed.setdefault(job_id, trio.Event()).wait()

    async def cancel(self, job_id: str) -> bool:
        """Stop a job this node submitted and wait for its task to set the final state; True if it is cancelled,
        False if it had ended already or its run is paid for (receipt stored, see _exchange): it ends completed."""
        row = self.store.get_job(job_id, "client")
        if row is None or row.state in TERMINAL or self.store.get_receipt(job_id) is not None:
            return False
        scope = self._scopes.get(job_id)
        if scope is None:  # no task to stop (never the case for a job this process started)
            self._set(job_id, state="cancelled", error="cancelled by the user")
        else:
            self._cancelling.add(job_id)
            scope.cancel()
            while job_id in self._scopes:
                await self.changed(job_id)
        row = self.store.get_job(job_id, "client")
        return row is not None and row.state == "cancelled"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ------------------------------------------------------------------------------------------- one job

    async def _run_job(self, job_id: str, scope: trio.CancelScope) -> None:
        with scope:
            try:
                waited = not self.queue.slot_free
                if waited:
                    stats = self.queue.statistics()
                    self._set(job_id, state="queued", error=f"waiting for one of this node's {stats.max_active} "
                              f"job slots ([jobs] max_active; {stats.waiting + 1} jobs waiting)")  # fmt: skip
                async with self.queue.slot():
                    if waited:
                        self._set(job_id, error=None)
                    await self._attempts(job_id)
            except Exception as exc:  # a bug must not take the daemon down with it; the job says what happened
                log.exception("job %s crashed", job_id)
                self._set(job_id, state="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        self._scopes.pop(job_id, None)
        self.queue.done(job_id)
        if job_id in self._cancelling:  # the user's cancel (a shutdown never gets here): end what was running
            self._cancelling.discard(job_id)
            if self._end_open_attempts(job_id, "cancelled", "cancelled by the user"):
                # The cancel came after the receipt arrived, before it was stored (the woken task stores it, then
                # stops at its next checkpoint): the run is paid for and its provider has our signature (_exchange).
                result = dict(self.store.get_job(job_id, "client").result or {}, verification="unverified: cancelled")  # type: ignore[union-attr]
                self._set(job_id, state="completed", error=None, result=result)
            else:
                self._set(job_id, state="cancelled", error="cancelled by the user")
        self._changed.pop(job_id, trio.Event()).set()  # cancel() waits for this task's end

    def _end_open_attempts(self, job_id: str, outcome: str, reason: str) -> bool:
        """End the open attempts, the paid one (see _exchange) as completed; True if the job has a receipt."""
        paid = self.store.get_receipt(job_id)
        for attempt in self.store.attempts(job_id):
            if attempt.ended_ms is not None:
                continue
            done = paid is not None and attempt.provider == paid.provider
            how, why = ("completed", "its receipt was stored") if done else (outcome, reason)
            self.store.end_attempt(job_id, attempt.attempt, outcome=how, now_ms=self.clock_ms(), reason=why)
        return paid is not None

    async def _attempts(self, job_id: str) -> None:
        row = self.store.get_job(job_id, "client")
        assert row is not None
        req = row.request
        if self.store.get_receipt(job_id) is not None:
            # A run was paid for before this node restarted: finish from its stored result (written before the
            # receipt, see _exchange) and never run the job again under an id that already has a receipt.
            await self._rate(job_id, Outcome.SUCCESS, 100)
            note = "unverified: this node restarted after the result arrived"
            self._set(job_id, state="completed", error=None, result=dict(row.result or {}, verification=note))
            return
        excluded: set[str] = set()
        failures: list[str] = []
        patience = trio.current_time() + self.discovery_patience_s
        busy_until = trio.current_time() + self.busy_patience_s
        backoff = DISCOVERY_RETRY_S
        while len(failures) < self.max_attempts:
            self._set(job_id, state="negotiating")
            chosen, reasons, candidates = await self._negotiate(job_id, req, excluded)
            if chosen is None and candidates == 0 and trio.current_time() < patience:
                # Nobody fits yet: the node may still be joining the network, or providers' ads are on their
                # way. Look again shortly rather than failing at once.
                await trio.sleep(DISCOVERY_RETRY_S)
                continue
            # A provider not answering may be loaded or restarting: worth waiting for, but only within the discovery
            # window (a dead one's ad can outlive it); busy ones are waited for up to the busy patience.
            now = trio.current_time()
            may_wait = set(reasons) <= WAIT_FOR and (RejectCode.TIMEOUT not in reasons or now < patience)
            if chosen is None and reasons and may_wait and now < busy_until:
                # Every fitting provider is busy right now: the job queues until a slot frees up.
                why = explain_failures(reasons, max_price=req["max_price"], candidates=candidates)
                self._set(job_id, state="queued", error=f"waiting for a free provider ({why})")
                await self._slot_waiters.wait(backoff)
                backoff = min(backoff * 2, BUSY_RETRY_MAX_S)
                continue
            if chosen is None:
                if failures:
                    text = f"failed on {len(failures)} provider(s): " + "; ".join(failures)
                    if reasons:
                        text += "; then " + explain_failures(reasons, max_price=req["max_price"], candidates=candidates)
                else:
                    text = explain_failures(reasons, max_price=req["max_price"], candidates=candidates)
                if reasons and may_wait:  # it was waiting, and its patience ran out
                    text = f"gave up after waiting {self.busy_patience_s:g} s for a free provider ([jobs] " \
                        f"busy_patience_seconds): {text}"  # fmt: skip
                self._set(job_id, state="failed", error=text)
                return
            agreement, provider = chosen
            attempt = self.store.add_attempt(job_id, provider=provider, now_ms=self.clock_ms())
            self._set(job_id, state="running", provider=provider)
            try:
                outcome = await self._transfer(job_id, req, agreement, provider)
            except AttemptFailed as exc:
                self.store.end_attempt(job_id, attempt, now_ms=self.clock_ms(), outcome="failed", reason=str(exc))
                failures.append(f"{provider[:16]}…: {exc}")
                excluded.add(provider)
                # A fresh discovery window for the next provider: an attempt that failed late (a preempted or
                # dead provider) must not leave the job no time to find another one.
                patience = trio.current_time() + self.discovery_patience_s
                continue
            try:
                outcome = await self.verifier.verify(job_id, req, provider, outcome, excluded | {provider})
            except ResultDisputed as exc:
                self.store.end_attempt(job_id, attempt, now_ms=self.clock_ms(), outcome="disputed", reason=str(exc))
                self._set(job_id, state="failed", error=str(exc))
                return
            lied = outcome["provider"] != provider
            self.store.end_attempt(
                job_id,
                attempt,
                now_ms=self.clock_ms(),
                outcome="bad-result" if lied else "completed",
                reason="outvoted by replicas" if lied else None,
            )
            self._set(job_id, state="completed", error=None, **outcome)
            return
        self._set(job_id, state="failed", error=f"failed on {len(failures)} provider(s): " + "; ".join(failures))

    # ------------------------------------------------------------------------------------------- verification

    async def _rate(self, wire_job_id: str, outcome: Outcome, score: int) -> None:
        row = self.store.get_receipt(wire_job_id)
        if self.reputation is not None and row is not None:
            await self.reputation.rate(receipt=row.receipt, outcome=outcome, score=score)

    async def _replicate(self, job_id: str, req: dict[str, Any], n: int, exclude: set[str]) -> Run | None:
        """Run the job again as ``<id>-v<n>`` on a provider not in ``exclude``; None if nobody could."""
        wire_id = f"{job_id}-v{n}"
        for _ in range(self.max_attempts):
            chosen, _reasons, _candidates = await self._negotiate(wire_id, req, exclude)
            if chosen is None:
                return None
            agreement, provider = chosen
            try:
                outcome = await self._transfer(
                    wire_id, req, agreement, provider, out_dir=self.jobs_dir / job_id / f"v{n}"
                )
            except AttemptFailed as exc:
                log.info("replica %s on %s failed: %s", wire_id, provider, exc)
                exclude = exclude | {provider}
                continue
            return Run(provider, wire_id, outcome)
        return None

    async def _open(self, peer_id: str, protocol: str) -> FrameChannel:
        if peer_id == self.identity.peer_id:
            if self.provider is None:
                raise AttemptFailed("this node does not provide")
            assert self._nursery is not None
            mine, theirs = loopback_pair(peer_id)
            handler = self.provider.rpc_negotiate if protocol == NEGOTIATE_PROTOCOL_ID else self.provider.rpc_job
            self._nursery.start_soon(wire.serve_loopback, handler, theirs)
            return mine
        try:
            return StreamChannel(await self.host.open_stream(peer_id, protocol))
        except net.NetError as exc:
            raise AttemptFailed(f"unreachable: {exc}") from exc

    async def _negotiate(
        self, job_id: str, req: dict[str, Any], excluded: set[str]
    ) -> tuple[tuple[Agreement, str] | None, list[RejectCode], int]:
        request = quote_request(job_id, req, client=self.identity.peer_id, now_ms=self.clock_ms())
        found = [p for p in await self.find_providers(req) if p not in excluded]
        fitting = [p for p in found if p == self.identity.peer_id or self.trust(p) >= self.refuse_below]
        self._wanting += 1
        try:
            while fitting and all(p in self._negotiating for p in fitting):
                # Every candidate is in a negotiation with another of our jobs: its quote would promise the slot
                # that job is about to take. Wait for one of those negotiations to end, then look again.
                await self._negotiation_ended.wait()
            # Alone, a job asks up to k providers and takes the best offer. When more of our jobs want providers
            # than there are, each asks its share, so they negotiate side by side instead of one after another
            # (every provider gets used either way), and the providers running fewest of our jobs first.
            share = max(1, -(-len(fitting) // self._wanting))
            free = sorted((p for p in fitting if p not in self._negotiating), key=lambda p: self._running_on[p])
            candidates = free[: min(self.k, share)]
        finally:
            self._wanting -= 1
        reasons: list[RejectCode] = []
        pending: list[_Pending] = []

        async def ask(provider: str) -> None:
            outcome = await self._ask(request, provider)
            if isinstance(outcome, _Pending):
                pending.append(outcome)
            else:
                reasons.append(outcome)

        self._negotiating.update(candidates)
        try:
            async with trio.open_nursery() as nursery:
                for provider in candidates:
                    nursery.start_soon(ask, provider)
            chosen = await self._choose(job_id, request, pending, reasons)
        finally:
            self._negotiating.difference_update(candidates)
            self._negotiation_ended.set()
            self._negotiation_ended = trio.Event()
        return chosen, reasons, len(candidates)

    async def _choose(
        self, job_id: str, request: QuoteRequest, pending: list[_Pending], reasons: list[RejectCode]
    ) -> tuple[Agreement, str] | None:
        """Accept the best offer that the provider still honours, withdraw from the rest; rejections go to
        ``reasons``."""
        offers = rank_offers([Offer(p.provider, p.cost, self.trust(p.provider), p.latency_ms) for p in pending])
        by_provider = {p.provider: p for p in pending}
        chosen: tuple[Agreement, str] | None = None
        try:
            for offer in offers:
                p = by_provider.pop(offer.provider)
                if chosen is not None:
                    self._record_quote(job_id, request, p, "declined")
                    await self._withdraw(p)
                    continue
                agreement = await self._close_deal(p)
                if isinstance(agreement, RejectCode):
                    # e.g. BUSY: another client took the slot between the quote and our accept
                    self._record_quote(job_id, request, p, f"rejected:{agreement.value}")
                    reasons.append(agreement)
                    continue
                self._record_quote(job_id, request, p, "accepted")
                self.store.put_agreement(agreement, role="client", now_ms=self.clock_ms())
                chosen = (agreement, p.provider)
        finally:
            for p in by_provider.values():
                await self._withdraw(p)
        return chosen

    def _record_quote(self, job_id: str, request: QuoteRequest, p: _Pending, outcome: str) -> None:
        self.store.record_quote(
            job_id=job_id,
            provider=p.provider,
            resource_class=resource_class(request),
            cost=p.cost,
            price_sheet=p.quote.price_sheet,
            load_permille=p.quote.load_permille,
            received_ms=self.clock_ms(),
            outcome=outcome,
        )

    async def _ask(self, request: QuoteRequest, provider: str) -> _Pending | RejectCode:
        started = trio.current_time()
        try:
            channel = await self._open(provider, NEGOTIATE_PROTOCOL_ID)
        except AttemptFailed:
            return RejectCode.TIMEOUT
        machine = ClientNegotiation(identity=self.identity, request=request, provider=provider)
        actions = machine.start(self.clock_ms())
        latency: float | None = None
        try:
            with trio.fail_after(NEGOTIATION_TIMEOUT_S):
                while True:
                    for action in actions:
                        if isinstance(action, Send):
                            await self.messenger.send(channel, action.message)
                        elif isinstance(action, Quoted):
                            assert latency is not None
                            return _Pending(provider, machine, channel, action.quote, action.cost, latency)
                        elif isinstance(action, Failed):
                            await channel.aclose()
                            return action.code
                    message = await self.messenger.receive(channel, (Quote, Reject))
                    latency = (trio.current_time() - started) * 1000 if latency is None else latency
                    if self.on_quote_latency is not None and isinstance(message, Quote):
                        self.on_quote_latency(latency)
                    actions = machine.receive(message, self.clock_ms())
        except (trio.TooSlowError, ChannelClosed, RemoteProtocolError) as exc:
            log.info("negotiation with %s failed: %r", provider, exc)
            await wire.abort_quietly(channel)
            return RejectCode.TIMEOUT

    async def _close_deal(self, p: _Pending) -> Agreement | RejectCode:
        """The agreement, or why the provider did not sign it (TIMEOUT if it did not answer in time)."""
        try:
            with trio.fail_after(NEGOTIATION_TIMEOUT_S):
                for action in p.machine.accept(self.clock_ms()):
                    if isinstance(action, Send):
                        await self.messenger.send(p.channel, action.message)
                while not p.machine.terminal:
                    message = await self.messenger.receive(p.channel, (Agreement, Reject))
                    p.machine.receive(message, self.clock_ms())
        except (trio.TooSlowError, ChannelClosed, RemoteProtocolError) as exc:
            log.info("closing the deal with %s failed: %r", p.provider, exc)
        finally:
            await wire.abort_quietly(p.channel)
        outcome = p.machine.outcome
        if isinstance(outcome, Completed):
            return outcome.agreement
        return outcome.code if isinstance(outcome, Failed) else RejectCode.TIMEOUT

    async def _withdraw(self, p: _Pending) -> None:
        try:
            for action in p.machine.withdraw():
                if isinstance(action, Send):
                    await self.messenger.send(p.channel, action.message)
        except ChannelClosed:
            pass
        await wire.abort_quietly(p.channel)

    # ------------------------------------------------------------------------------------------- transfer

    async def _transfer(
        self, job_id: str, req: dict[str, Any], agreement: Agreement, provider: str, *, out_dir: Path | None = None
    ) -> dict[str, Any]:
        """Run one attempt on ``provider``; return the job fields to store on success.

        ``job_id`` is the id on the wire (a verification replica has its own); logs and outputs go to ``out_dir``
        (default: the job's dir), inputs always come from the job's dir.
        """
        base_id = base_job_id(job_id)
        job_dir = out_dir or self.jobs_dir / base_id
        job_dir.mkdir(parents=True, exist_ok=True)
        inputs = tuple(
            FileRef(name=i["name"], sha256=bytes.fromhex(i["sha256"]), size=i["size"]) for i in req["inputs"]
        )
        spec = JobSpec(job_id=job_id, client=self.identity.peer_id, agreement_hash=terms_hash(agreement),
                       command=tuple(req["command"]), env=req["env"], inputs=inputs, outputs=tuple(req["outputs"]),
                       limits=agreement.limits, gpus=agreement.resources.gpus)  # fmt: skip
        channel = await self._open(provider, JOB_PROTOCOL_ID)
        self._running_on[provider] += 1
        try:
            outcome = await self._exchange(channel, spec, agreement, job_dir)
        except AttemptFailed:
            await wire.abort_quietly(channel)
            raise
        except (ChannelClosed, net.NetError) as exc:
            await wire.abort_quietly(channel)
            raise AttemptFailed(f"the provider went away ({exc})") from exc
        except trio.TooSlowError as exc:
            await wire.abort_quietly(channel)
            raise AttemptFailed("the provider stalled (no heartbeat)") from exc
        except RemoteProtocolError as exc:
            await wire.abort_quietly(channel)
            raise AttemptFailed(f"the provider broke the protocol: {exc.code}: {exc}") from exc
        except BaseException:
            await wire.abort_quietly(channel)
            raise
        finally:
            self._running_on[provider] -= 1
            if not self._running_on[provider]:
                del self._running_on[provider]
            self._slot_waiters.freed()  # however it ended, the run holds no slot on the provider now
        await channel.aclose()
        return outcome

    async def _exchange(
        self, channel: FrameChannel, spec: JobSpec, agreement: Agreement, job_dir: Path
    ) -> dict[str, Any]:
        m = self.messenger
        await m.send(channel, spec)
        with trio.fail_after(STALL_TIMEOUT_S):
            answer = await m.receive(channel, (JobAccepted, Reject))
        if isinstance(answer, Reject):
            raise AttemptFailed(f"refused: {answer.code.value}: {answer.message}")
        for ref in spec.inputs:
            await send_file(m, channel, job_id=spec.job_id, kind=ChunkKind.INPUT, name=ref.name,
                            path=self.jobs_dir / base_job_id(spec.job_id) / "inputs" / ref.name)  # fmt: skip
        logs = {ChunkKind.STDOUT: job_dir / "stdout", ChunkKind.STDERR: job_dir / "stderr"}
        digests = {kind: hashlib.sha256() for kind in logs}
        for path in logs.values():
            path.write_bytes(b"")
        while True:
            with trio.fail_after(STALL_TIMEOUT_S):
                message = await m.receive(channel, (Chunk, JobResult, Reject))
            if isinstance(message, Reject):
                raise AttemptFailed(f"the provider gave up: {message.code.value}: {message.message}")
            if isinstance(message, JobResult):
                result = message
                break
            if message.job_id != spec.job_id:
                raise AttemptFailed("a log chunk for another job")
            if message.kind in logs:
                digests[message.kind].update(message.data)
                with logs[message.kind].open("ab") as f:
                    f.write(message.data)
                self._changed.pop(spec.job_id, trio.Event()).set()
        if result.job_id != spec.job_id or result.provider != agreement.provider:
            raise AttemptFailed("the result names another job or provider")
        if digests[ChunkKind.STDOUT].digest() != result.stdout_sha256:
            raise AttemptFailed("stdout does not match the digest in the signed result")
        if not {o.name for o in result.outputs} <= set(spec.outputs):
            raise AttemptFailed("the result holds outputs that were not asked for")
        outputs_dir = job_dir / "outputs"
        outputs_dir.mkdir(exist_ok=True)
        try:
            for ref in result.outputs:
                with trio.fail_after(STALL_TIMEOUT_S):
                    await receive_file(m, channel, job_id=spec.job_id, kind=ChunkKind.OUTPUT, ref=ref,
                                       dest=outputs_dir / ref.name)  # fmt: skip
        except DigestMismatch as exc:
            await m.send(channel, Reject(job_id=spec.job_id, peer=self.identity.peer_id, code=RejectCode.BAD_RESULT,
                                         message="an output does not match its signed digest"))  # fmt: skip
            raise AttemptFailed(f"bad output: {exc}") from exc
        with trio.fail_after(STALL_TIMEOUT_S):
            receipt = await m.receive(channel, (Receipt,))
        problem = receipt_problem(receipt, spec, agreement, result, client=self.identity.peer_id)
        if problem:
            await m.send(channel, Reject(job_id=spec.job_id, peer=self.identity.peer_id, code=RejectCode.BAD_RECEIPT,
                                         message=problem))  # fmt: skip
            raise AttemptFailed(f"bad receipt: {problem}")
        signed = sign_as(self.identity, receipt, "client")
        outputs = {o.name: {"sha256": o.sha256.hex(), "size": o.size} for o in result.outputs}
        missing = [name for name in spec.outputs if name not in outputs]
        outcome = {
            "exit_status": result.exit_status,
            "termination": result.termination.value,
            "cost": receipt.cost,
            "result": {"outputs": outputs, "missing_outputs": missing, "usage": codec.to_plain(result.usage),
                       "provider": result.provider, "receipt_hash": terms_hash(signed).hex(),
                       "stdout_sha256": result.stdout_sha256.hex()},
        }  # fmt: skip
        # Write ahead: the result, then the receipt, are stored before the provider gets our signature, so every
        # receipt a provider holds, this node holds too, and a restart from here on finishes the job from the
        # store (_attempts) instead of running it again under an id that has a receipt.
        if spec.job_id == base_job_id(spec.job_id):
            self.store.update_job(spec.job_id, "client", now_ms=self.clock_ms(), **outcome)
        self.store.put_receipt(signed)
        with trio.move_on_after(STALL_TIMEOUT_S) as sending:
            sending.shield = True  # paid for: a cancel from now on must not keep our signature from the provider
            try:
                await m.send(channel, signed)
            except (ChannelClosed, net.NetError) as exc:  # the run is done and paid for here; the provider went away
                log.warning("job %s: the provider went away before our receipt signature reached it: %r",
                            spec.job_id, exc)  # fmt: skip
        if sending.cancelled_caught:
            log.warning("job %s: our receipt signature did not reach the provider in time", spec.job_id)
        return outcome
