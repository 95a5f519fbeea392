"""The provider side of the market: quoting (`/coop/negotiate/1.0.0`) and running jobs (`/coop/job/1.0.0`).

Theory of operation
-------------------
Negotiation: each inbound stream gets a fresh :class:`~protocol.negotiation.ProviderNegotiation` driven by a
:class:`~protocol.market.MarketPolicy` snapshot (floor prices, utilisation, capacity, free slots). A completed
negotiation stores the doubly-signed Agreement and reserves a job slot for a short while.

Job transfer, in order on one stream::

    client -> JobSpec (signed)             provider checks: agreement known, for this client and job, limits
                                           as agreed, inputs within the disk cap, agreement not used before
    client <- JobAccepted (signed) | Reject
    client -> input Chunks                 sizes and sha256 checked against the JobSpec as they arrive
    client <- stdout/stderr Chunks, heartbeats   (live, while the sandboxed job runs)
    client <- JobResult (signed)           exit status, termination reason, output digests, metered usage
    client <- output Chunks
    client <- Receipt (provider-signed)    cost from the agreed price sheet, capped at the agreed maximum
    client -> Receipt (both signatures) | Reject

If the client goes away before the result, the job is killed and no receipt exists. If the stream breaks after
the provider's receipt went out, the client may hold it countersigned (it stores it before sending it back), so
the provider asks for it over ``/coop/receipt/1.0.0`` (node/market/settle.py). Every refusal is a signed
Reject with a code; garbage from the peer raises RemoteProtocolError and the stream is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from node.market.settle import OpenChannel, fetch_receipt
from node.market.transfer import DigestMismatch, receive_file, send_file
from node.market.wire import ChannelClosed, FrameChannel, Messenger, abort_quietly
from node.runtimes import ResolvedRuntime
from node.sandbox.errors import AdmissionRefused, SandboxUnavailable, WorkDirError
from node.sandbox.executor import Executor
from node.sandbox.spec import ExecResult, ExecSpec, InputFile
from node.sandbox.spec import Limits as SandboxLimits
from node.store import Store
from protocol.cosign import sign_as, terms_hash, verify_both
from protocol.envelope import message_hash
from protocol.errors import BadSignature, RemoteProtocolError
from protocol.identity import Identity
from protocol.market import MarketPolicy, resource_class, runtime_mismatch
from protocol.messages import (
    Accept,
    Agreement,
    Chunk,
    ChunkKind,
    Counter,
    FileRef,
    JobAccepted,
    JobResult,
    JobSpec,
    PriceSheet,
    QuoteRequest,
    Receipt,
    Reject,
    RejectCode,
    Termination,
    Usage,
)
from protocol.negotiation import Completed, Failed, ProviderNegotiation, Send
from protocol.pricing import cost_of, worst_case_cost

log = logging.getLogger(__name__)

RESERVATION_S: Final = 30.0  # a slot stays reserved this long after an agreement, waiting for the job
HEARTBEAT_S: Final = 2.0  # the client treats silence much longer than this as a stalled provider
RECEIPT_WAIT_S: Final = 30.0
STEP_TIMEOUT_S: Final = 30.0
LOG_CHUNK_BYTES: Final = 64 << 10  # any single message the provider waits for (negotiation, inputs)


class ProviderService:
    """Answers quote requests and runs agreed jobs in the sandbox."""

    def __init__(
        self,
        *,
        identity: Identity,
        messenger: Messenger,
        store: Store,
        executor: Executor | None,
        work_root: Path,
        price_sheet: PriceSheet,
        capacity: Callable[[], tuple[int, int, int, tuple[str, ...]]],
        max_concurrent: int,
        clock_ms: Callable[[], int],
        blocked: frozenset[str] = frozenset(),
        on_receipt: Callable[[Receipt], Awaitable[None]] | None = None,
        runtimes: Sequence[ResolvedRuntime] = (),
        open_channel: OpenChannel | None = None,
    ) -> None:
        self.identity = identity
        self.messenger = messenger
        self.store = store
        self.executor = executor
        self.work_root = work_root
        self.price_sheet = price_sheet
        self.capacity = capacity  # () -> (cpus, memory_bytes, disk_bytes, gpu models)
        self.max_concurrent = max_concurrent
        self.clock_ms = clock_ms
        self.blocked = blocked
        self.on_receipt = on_receipt  # rates the client once the receipt is signed by both
        self.open_channel = open_channel  # to ask a client for a countersignature that never came (settle.py)
        self.runtimes = {r.name: r for r in runtimes if r.usable}  # offered runtimes (node.runtimes)
        self.running: dict[str, trio.CancelScope] = {}
        self._reserved: dict[bytes, float] = {}
        self._superseded: set[str] = set()  # runs stopped because their client sent the job again
        self._done: dict[str, trio.Event] = {}  # set when a job's run here has ended and been recorded
        self._settling: dict[str, trio.CancelScope] = {}  # runs whose countersignature we are asking for
        self._starting: set[str] = set()  # agreed jobs between their JobSpec and their start (they hold a slot)
        self.quotes_sent = 0
        self.rejects_sent = 0
        self.agreements = 0
        self.jobs_refused = 0
        # Owner control (node/owner.py sets these): why not to take jobs now ("" = take them), which GPUs may
        # be handed out (None: every GPU, from index 0), and the jobs stopped because the owner took the machine.
        self.owner_refusal: Callable[[], str] = lambda: ""
        self.offered_gpus: tuple[int, ...] | None = None
        self.preempted: dict[str, str] = {}
        self.jobs_preempted = 0

    # ------------------------------------------------------------------------------------------- negotiation

    def _free_slots(self) -> int:
        now = trio.current_time()
        self._reserved = {h: t for h, t in self._reserved.items() if t > now}
        return self.max_concurrent - len(self.running) - len(self._reserved) - len(self._starting)

    def policy(self) -> MarketPolicy:
        cpus, memory, disk, models = self.capacity()
        used = len(self.running) + len(self._reserved) + len(self._starting)
        return MarketPolicy(
            floor=self.price_sheet,
            load_permille=min(1000, used * 1000 // max(1, self.max_concurrent)),
            cpus=cpus,
            memory_bytes=memory,
            disk_bytes=disk,
            gpu_models=models,
            free_slots=self._free_slots() if self.executor is not None and not self.owner_refusal() else 0,
            blocked=self.blocked,
            runtimes=tuple(r.wire() for r in self.runtimes.values()),
        )

    async def rpc_negotiate(self, channel: FrameChannel) -> None:
        """Serve one negotiation on ``channel`` until it completes, fails or times out."""
        policy = self.policy()
        machine = ProviderNegotiation(identity=self.identity, policy=policy, load_permille=policy.load_permille)
        expected = (QuoteRequest, Counter, Accept, Reject)
        while not machine.terminal:
            try:
                with trio.fail_after(STEP_TIMEOUT_S):
                    message = await self.messenger.receive(channel, expected)
            except trio.TooSlowError:
                machine.on_timeout(self.clock_ms() + 10**9)
                return
            except ChannelClosed:
                return
            if isinstance(message, QuoteRequest) and self.executor is None:
                await self._send(
                    channel,
                    Reject(
                        job_id=message.job_id,
                        peer=self.identity.peer_id,
                        code=RejectCode.UNSUPPORTED,
                        message="this node has no usable sandbox (see `node doctor`)",
                    ),
                )
                return
            hold = b""
            if isinstance(message, Accept):
                # The quote promised a free slot when the negotiation began; concurrent negotiations may have
                # taken every slot since. Check again, and hold one until the agreement reserves it.
                if self._free_slots() <= 0:
                    self.rejects_sent += 1
                    text = "every job slot was taken while we negotiated; ask again shortly"
                    await self._send(channel, Reject(job_id=message.job_id, peer=self.identity.peer_id,
                                                     code=RejectCode.BUSY, message=text))  # fmt: skip
                    return
                hold = secrets.token_bytes(16)
                self._reserved[hold] = trio.current_time() + RESERVATION_S
            try:
                for action in machine.receive(message, self.clock_ms()):
                    if isinstance(action, Send):
                        if isinstance(action.message, Reject):
                            self.rejects_sent += 1
                        elif not isinstance(action.message, Agreement):
                            self.quotes_sent += 1
                        await self._send(channel, action.message)
                    elif isinstance(action, Completed):
                        self._on_agreement(action.agreement, machine.request)
                    elif isinstance(action, Failed):
                        log.debug("negotiation ended: %s %s", action.code, action.message)
            finally:
                self._reserved.pop(hold, None)

    def _on_agreement(self, agreement: Agreement, request: QuoteRequest | None) -> None:
        self.agreements += 1
        self.store.put_agreement(agreement, role="provider", now_ms=self.clock_ms())
        self._reserved[terms_hash(agreement)] = trio.current_time() + RESERVATION_S
        if request is not None:
            log.info("agreed job %s with %s (%s)", agreement.job_id, agreement.client, resource_class(request))

    async def _send(self, channel: FrameChannel, message: object) -> None:
        try:
            await self.messenger.send(channel, message)
        except ChannelClosed:
            log.debug("peer went away before %s could be sent", type(message).__name__)

    async def _refuse(self, channel: FrameChannel, job_id: str, code: RejectCode, text: str) -> None:
        self.jobs_refused += 1
        await self._send(channel, Reject(job_id=job_id, peer=self.identity.peer_id, code=code, message=text))

    # ------------------------------------------------------------------------------------------- job transfer

    def _check_spec(self, spec: JobSpec, channel: FrameChannel) -> tuple[Agreement | None, RejectCode, str]:
        row = self.store.get_agreement(spec.agreement_hash)
        agreement = None if row is None else row.agreement
        if agreement is None or agreement.provider != self.identity.peer_id:
            return None, RejectCode.UNKNOWN_AGREEMENT, "no agreement with this provider has that hash"
        try:
            verify_both(agreement)
        except BadSignature:
            return None, RejectCode.BAD_SIGNATURE, "the agreement's signatures do not verify"
        if agreement.client != spec.client or agreement.job_id != spec.job_id or channel.remote_peer != spec.client:
            return None, RejectCode.BAD_REQUEST, "the job does not match its agreement"
        if spec.limits != agreement.limits or spec.gpus > agreement.resources.gpus:
            return None, RejectCode.BAD_REQUEST, "the job's limits differ from the agreed ones"
        total_in = sum(f.size for f in spec.inputs)
        if total_in > min(agreement.resources.disk_bytes, spec.limits.disk_bytes):
            return None, RejectCode.INSUFFICIENT_RESOURCES, "the inputs are larger than the agreed disk"
        offered = tuple(r.wire() for r in self.runtimes.values())
        missing = runtime_mismatch(offered, agreement.resources)
        if missing:  # the runtime went away (or changed) since the agreement: refuse, never run elsewhere
            return None, RejectCode.NO_RUNTIME, missing
        return agreement, RejectCode.INTERNAL, ""

    async def rpc_job(self, channel: FrameChannel) -> None:
        """Serve one job transfer on ``channel`` (see the module docstring for the sequence)."""
        with trio.fail_after(STEP_TIMEOUT_S):
            spec: JobSpec = await self.messenger.receive(channel, (JobSpec,))
        agreement, code, text = self._check_spec(spec, channel)
        if agreement is None:
            await self._refuse(channel, spec.job_id, code, text)
            return
        agreement_hash = terms_hash(agreement)
        if self.executor is None:
            await self._refuse(channel, spec.job_id, RejectCode.UNSUPPORTED, "this node has no usable sandbox")
            return
        if not self.store.consume_agreement(agreement_hash):
            await self._refuse(channel, spec.job_id, RejectCode.AGREEMENT_USED, "that agreement was already used")
            return
        # The agreement's reservation becomes a "starting" slot until the job runs (or fails to start): between the
        # two, the slot must not look free to a concurrent negotiation.
        self._reserved.pop(agreement_hash, None)
        self._starting.add(spec.job_id)
        try:
            await self._start_job(channel, spec, agreement)
        finally:
            self._starting.discard(spec.job_id)

    async def _start_job(self, channel: FrameChannel, spec: JobSpec, agreement: Agreement) -> None:
        if self.owner_refusal():
            text = "this machine's owner has it back; try another provider"
            await self._refuse(channel, spec.job_id, RejectCode.BUSY, text)
            return
        if self.store.get_receipt(spec.job_id) is not None:
            # Receipts are keyed by job id: a second job under the same id could never be settled.
            text = "a job with that id already ran here; submit it under a new id"
            await self._refuse(channel, spec.job_id, RejectCode.BAD_REQUEST, text)
            return
        if spec.job_id in self.running and not await self._replace_stale_run(spec):
            await self._refuse(channel, spec.job_id, RejectCode.BUSY, "that job is already running here")
            return
        settling = self._settling.get(spec.job_id)
        if settling is not None:
            # A run of this job ended here and we are asking its client for the countersignature; the client sent
            # the job again, so it holds no receipt for that run (it would finish from its store instead). Record
            # that run as failed before this one starts, so the two never write the job's row at once.
            settling.cancel()
            with trio.move_on_after(STEP_TIMEOUT_S):
                await self._done[spec.job_id].wait()
        done = self._done[spec.job_id] = trio.Event()
        job_dir = self.work_root / f"{spec.job_id}-{secrets.token_hex(4)}"
        job_dir.mkdir(parents=True)
        try:
            await self._run_job(channel, spec, agreement, job_dir)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
            done.set()
            if self._done.get(spec.job_id) is done:
                del self._done[spec.job_id]

    async def _replace_stale_run(self, spec: JobSpec) -> bool:
        """The same client sends a job that is still running here: it restarted and lost that run's stream, so
        that run's result can never reach it. Stop that run (recorded as such) and let this one start.

        Returns:
            False if the running job is another client's, or if it did not end in time.
        """
        row = self.store.get_job(spec.job_id, "provider")
        done = self._done.get(spec.job_id)
        if row is None or row.client != spec.client or done is None:
            return False
        log.info("job %s: its client sent it again; stopping the run it can no longer hear from", spec.job_id)
        self._superseded.add(spec.job_id)
        self.running[spec.job_id].cancel()
        with trio.move_on_after(STEP_TIMEOUT_S):
            await done.wait()
        return spec.job_id not in self.running

    async def _run_job(self, channel: FrameChannel, spec: JobSpec, agreement: Agreement, job_dir: Path) -> None:
        now = self.clock_ms()
        request = {
            "command": list(spec.command),
            "outputs": list(spec.outputs),
            "agreement": terms_hash(agreement).hex(),
        }
        if self.store.get_job(spec.job_id, "provider") is None:
            self.store.create_job(job_id=spec.job_id, role="provider", now_ms=now, client=spec.client,
                                  provider=self.identity.peer_id, request=request)  # fmt: skip
        else:  # the client retried this job here (after a restart): a new run, recorded as an attempt
            self.store.update_job(spec.job_id, "provider", now_ms=now, state="running", error=None)
        attempt = self.store.add_attempt(spec.job_id, provider=self.identity.peer_id, now_ms=now, role="provider")
        try:
            await self._admitted(channel, spec, agreement, job_dir)
        finally:
            row = self.store.get_job(spec.job_id, "provider")
            outcome = "failed" if row is None or row.state == "running" else row.state
            if row is not None and row.state == "running":
                self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="failed",
                                      error="the transfer broke off")  # fmt: skip
            self.store.end_attempt(spec.job_id, attempt, outcome=outcome, now_ms=self.clock_ms(), role="provider")

    async def _admitted(self, channel: FrameChannel, spec: JobSpec, agreement: Agreement, job_dir: Path) -> None:
        await self.messenger.send(channel, JobAccepted(job_id=spec.job_id, provider=self.identity.peer_id))
        inputs_dir = job_dir / "inputs"
        inputs_dir.mkdir()
        try:
            for ref in spec.inputs:
                with trio.fail_after(STEP_TIMEOUT_S):
                    await receive_file(self.messenger, channel, job_id=spec.job_id, kind=ChunkKind.INPUT,
                                       ref=ref, dest=inputs_dir / ref.name)  # fmt: skip
        except DigestMismatch as exc:
            await self._refuse(channel, spec.job_id, RejectCode.BAD_INPUT, str(exc))
            self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="failed", error=str(exc))
            return
        runtime = self.runtimes.get(agreement.resources.runtime)
        exec_spec = ExecSpec(
            command=spec.command,
            work_dir=job_dir / "work",
            # The runtime's PATH (and VIRTUAL_ENV or PYTHONPATH) over the client's: it selects the interpreter.
            env={**spec.env, **(runtime.env if runtime else {})},
            ro_binds=runtime.binds if runtime else (),
            inputs=tuple(InputFile(name=r.name, source=inputs_dir / r.name) for r in spec.inputs),
            outputs=spec.outputs,
            limits=SandboxLimits(
                cpu_seconds=float(spec.limits.cpu_seconds),
                wall_seconds=float(spec.limits.wall_seconds),
                memory_bytes=max(1, spec.limits.memory_bytes),
                disk_bytes=max(1, spec.limits.disk_bytes),
                output_bytes=max(1, spec.limits.output_bytes),
                cpu_cores=float(agreement.resources.cpus),
            ),
            gpus=self._pick_gpus(spec.gpus),
        )
        result = await self._execute(channel, spec, exec_spec)
        if result is None:
            return
        await self._deliver(channel, spec, agreement, exec_spec, result)

    async def _execute(self, channel: FrameChannel, spec: JobSpec, exec_spec: ExecSpec) -> ExecResult | None:
        """Run the job, streaming its output live; None if it could not run or the client went away."""
        assert self.executor is not None
        job_scope = trio.CancelScope()
        self.running[spec.job_id] = job_scope
        self._starting.discard(spec.job_id)
        client_gone = False

        async def send_or_stop(message: Chunk) -> None:
            nonlocal client_gone
            if client_gone:
                return
            try:
                await self.messenger.send(channel, message)
            except ChannelClosed:
                client_gone = True
                job_scope.cancel()

        async def on_output(stream: str, data: bytes) -> None:
            kind = ChunkKind.STDOUT if stream == "stdout" else ChunkKind.STDERR
            for start in range(0, len(data), LOG_CHUNK_BYTES):
                await send_or_stop(Chunk(job_id=spec.job_id, kind=kind, data=data[start : start + LOG_CHUNK_BYTES]))

        async def heartbeat() -> None:
            while not client_gone:
                await trio.sleep(HEARTBEAT_S)
                await send_or_stop(Chunk(job_id=spec.job_id, kind=ChunkKind.HEARTBEAT))

        result: ExecResult | None = None
        error: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(heartbeat)
                try:
                    result = await self.executor.run(exec_spec, on_output=on_output, cancel_scope=job_scope)
                except (AdmissionRefused, SandboxUnavailable, WorkDirError) as exc:
                    error = str(exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.running.pop(spec.job_id, None)
        if spec.job_id in self._superseded:
            self._superseded.discard(spec.job_id)
            self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="cancelled",
                                  error="its client restarted and sent the job again; this run was killed")  # fmt: skip
            return None
        why = self.preempted.pop(spec.job_id, None)
        if why is not None and not client_gone:
            self.jobs_preempted += 1
            await self._refuse(channel, spec.job_id, RejectCode.PREEMPTED, why)
            self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="cancelled",
                                  error=f"preempted: {why}")  # fmt: skip
            return None
        if client_gone:
            self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="cancelled",
                                  error="the client went away; the job was killed")  # fmt: skip
            return None
        if error is not None:
            log.warning("job %s could not start: %s", spec.job_id, error)
            await self._refuse(channel, spec.job_id, RejectCode.INTERNAL, "the provider could not start the job")
            self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="failed", error=error)
            return None
        return result

    def preempt_all(self, reason: str) -> int:
        """Stop every running job and hand it back to its client with a PREEMPTED reject (retryable elsewhere)."""
        for job_id, scope in self.running.items():
            self.preempted[job_id] = reason
            scope.cancel()
        return len(self.running)

    def _pick_gpus(self, wanted: int) -> tuple[int, ...]:
        if self.offered_gpus is None or self.executor is None:
            return tuple(range(wanted))
        busy = self.executor.gpus_in_use()
        free = [g for g in self.offered_gpus if g not in busy]
        return tuple(free[:wanted]) if len(free) >= wanted else tuple(range(wanted))  # admission then says why

    async def _deliver(
        self, channel: FrameChannel, spec: JobSpec, agreement: Agreement, exec_spec: ExecSpec, result: ExecResult
    ) -> None:
        import hashlib

        usage = Usage(
            cpu_ms=int(result.usage.cpu_seconds * 1000),
            wall_ms=int(result.usage.wall_seconds * 1000),
            peak_memory_bytes=result.usage.peak_memory_bytes,
            gpu_ms=int(result.usage.gpu_seconds * 1000),
        )
        outputs = tuple(FileRef(name=o.name, sha256=bytes.fromhex(o.sha256), size=o.size) for o in result.outputs)
        job_result = JobResult(
            job_id=spec.job_id,
            provider=self.identity.peer_id,
            exit_status=-1 if result.exit_status is None else max(-255, min(255, result.exit_status)),
            termination=Termination(result.termination.value),
            outputs=outputs,
            usage=usage,
            stdout_sha256=hashlib.sha256(result.stdout).digest(),
            stderr_sha256=hashlib.sha256(result.stderr).digest(),
        )
        ours: Receipt | None = None
        try:
            await self.messenger.send(channel, job_result)
            for ref in outputs:
                await send_file(self.messenger, channel, job_id=spec.job_id, kind=ChunkKind.OUTPUT, name=ref.name,
                                path=exec_spec.work_dir / ref.name)  # fmt: skip
            receipt = Receipt(
                job_id=spec.job_id,
                client=spec.client,
                provider=self.identity.peer_id,
                agreement_hash=terms_hash(agreement),
                result_hash=message_hash(job_result),
                usage=usage,
                cost=cost_of(usage, agreement.price_sheet, max_cost=agreement.max_cost),
                issued_at=self.clock_ms(),
            )
            ours = sign_as(self.identity, receipt, "provider")
            await self.messenger.send(channel, ours)
            with trio.fail_after(RECEIPT_WAIT_S):
                answer = await self.messenger.receive(channel, (Receipt, Reject))
        except (ChannelClosed, trio.TooSlowError) as exc:
            # The client may hold the countersigned receipt (it stores it before sending it): ask for it.
            late = None
            if ours is not None and self.open_channel is not None:
                log.info("job %s: no countersignature on the job stream (%r); asking the client", spec.job_id, exc)
                # Reset the job stream first: a client that has not read our receipt yet never will, so a client
                # without the receipt now will never hold it, and "no receipt" is a final answer.
                await abort_quietly(channel)
                try:
                    with trio.CancelScope() as self._settling[spec.job_id]:  # _start_job cancels it: see there
                        late = await fetch_receipt(self.messenger, self.open_channel, ours)
                finally:
                    del self._settling[spec.job_id]
            if late is None:
                log.warning("job %s: no countersigned receipt from the client: %r", spec.job_id, exc)
                self.store.update_job(spec.job_id, "provider", now_ms=self.clock_ms(), state="failed",
                                      error="the client went away before signing the receipt")  # fmt: skip
                return
            answer = late
        state, error = "completed", None
        if isinstance(answer, Reject):
            state, error = "failed", f"the client refused the result: {answer.code.value}: {answer.message}"
        elif dataclasses.replace(answer, client_signature=b"") != ours:
            raise RemoteProtocolError("the countersigned receipt differs from the one we signed")
        else:
            verify_both(answer)
            self.store.put_receipt(answer)
            if self.on_receipt is not None:
                await self.on_receipt(answer)
        self.store.update_job(
            spec.job_id, "provider", now_ms=self.clock_ms(), state=state, error=error,
            exit_status=job_result.exit_status, termination=job_result.termination.value,
            cost=receipt.cost if state == "completed" else None,
        )  # fmt: skip


def worst_case(request: QuoteRequest, sheet: PriceSheet) -> int:
    return worst_case_cost(request.resources, request.limits, sheet)
