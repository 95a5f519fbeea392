"""The hostile-peer fuzz tests' world: one real provider (store, services, replay cache) over in-memory
channels, honest helpers, and the frames they send. Shared by tests/test_fuzz_wire.py and
tests/test_fuzz_reputation.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

from node.market.jobs import TERMINAL, JobManager
from node.market.provider import ProviderService
from node.market.settle import answer_receipt_query
from node.market.wire import LOOPBACK_BUFFER, MAX_FRAME_BYTES, ChannelClosed, MemoryChannel, Messenger
from node.reputation.records import RecordStore
from node.reputation.service import ReputationService
from node.sandbox.spec import ExecResult, OutputFile, Tier
from node.sandbox.spec import Termination as SandboxTermination
from node.sandbox.spec import Usage as SandboxUsage
from node.store import JobRow, Store
from protocol import codec, envelope
from protocol.cosign import sign_as, terms_hash
from protocol.envelope import Envelope, seal
from protocol.errors import RemoteProtocolError
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Agreement,
    Chunk,
    ChunkKind,
    Counter,
    JobAccepted,
    JobResult,
    JobSpec,
    Limits,
    Outcome,
    PriceSheet,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    ReputationRecord,
    Resources,
    Usage,
)
from protocol.negotiation import ClientNegotiation, Completed, Quoted, Send
from protocol.reputation import RecordBundle, make_bundle
from tests.factories import NOW

ALLOWED = (RemoteProtocolError, ChannelClosed, trio.TooSlowError)
PROVIDER = Identity.from_seed(b"P" * 32)
CLIENT = Identity.from_seed(b"C" * 32)
MALLORY = Identity.from_seed(b"M" * 32)
FLOOR = PriceSheet(start_fee=10, per_cpu_second=5, per_gib_second=1)
NEGOTIATE_TYPES = (QuoteRequest, Counter, Accept, Reject)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    # The world (store, services) is shared by the examples on purpose: state must survive all of them.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def wall_ms() -> int:
    return NOW + int(trio.current_time() * 1000)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class FakeExecutor:
    """Stands in for the sandbox: every job "prints 42" and writes its outputs at once; nothing is started."""

    async def run(self, spec, *, on_output=None, cancel_scope=None):
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        outputs = []
        for name in spec.outputs:
            data = b"out:" + name.encode()
            (spec.work_dir / name).write_bytes(data)
            outputs.append(OutputFile(name=name, sha256=digest(data).hex(), size=len(data)))
        if on_output is not None:
            await on_output("stdout", b"42\n")
        return ExecResult(
            termination=SandboxTermination.EXITED,
            exit_status=0,
            outputs=tuple(outputs),
            missing_outputs=(),
            stdout=b"42\n",
            stderr=b"",
            tier=Tier.UNSANDBOXED,
            detail="fake",
            usage=SandboxUsage(cpu_seconds=0.01, wall_seconds=0.02, peak_memory_bytes=1 << 20),
        )


@dataclass
class Pair:
    client: MemoryChannel  # the peer's end (names the provider)
    server: MemoryChannel  # the handler's end (names the peer, as the authenticated libp2p stream would)
    client_send: trio.MemorySendChannel[bytes]  # to half-close the peer's side

    async def finish_sending(self) -> None:
        await self.client_send.aclose()


def channel_pair(peer: str = CLIENT.peer_id) -> Pair:
    c_send, s_recv = trio.open_memory_channel[bytes](LOOPBACK_BUFFER)
    s_send, c_recv = trio.open_memory_channel[bytes](LOOPBACK_BUFFER)
    return Pair(MemoryChannel(PROVIDER.peer_id, c_send, c_recv), MemoryChannel(peer, s_send, s_recv), c_send)


@dataclass
class World:
    store: Store
    provider: ProviderService
    reputation: ReputationService
    work_root: Path
    peer: ReputationService  # another node's reputation service (own store), for the pull path
    client: Messenger = field(default_factory=lambda: Messenger(CLIENT, wall_ms))
    ids: itertools.count = field(default_factory=itertools.count)

    def job_id(self) -> str:
        return f"job-{next(self.ids)}"

    def handler(self, name: str) -> Callable[[MemoryChannel], Awaitable[None]]:
        return {
            "negotiate": self.provider.rpc_negotiate,
            "job": self.provider.rpc_job,
            "sync": self.reputation.rpc_sync,
            "receipt": partial(answer_receipt_query, self.provider.messenger, self.store),
        }[name]

    def check(self) -> None:
        """The cheap state invariant, after every example: nothing left running, on disk, or marked running."""
        assert self.provider.running == {}
        assert list(self.work_root.iterdir()) == []
        assert [r.job_id for r in self.store.unfinished_jobs("provider")] == []

    async def still_serves(self) -> None:
        """The full state invariant, after every test: an honest deal and job still go through."""
        self.check()
        receipt = await honest_job(self, await honest_negotiation(self))
        assert self.store.get_receipt(receipt.job_id) is not None


@pytest.fixture
def world(tmp_path, autojump_clock):
    """A provider's services on one store, shared by every example of a test; at the end of the test (in trio
    time, on the test's clock) an honest negotiation and job must still complete."""
    store = Store.open(tmp_path / "coop.db")
    work_root = tmp_path / "work"
    work_root.mkdir()
    provider = ProviderService(
        identity=PROVIDER,
        messenger=Messenger(PROVIDER, wall_ms),
        store=store,
        executor=FakeExecutor(),  # type: ignore[arg-type]
        work_root=work_root,
        price_sheet=FLOOR,
        capacity=lambda: (8, 16 << 30, 100 << 30, ()),
        max_concurrent=4,
        clock_ms=wall_ms,
    )
    reputation = ReputationService(identity=PROVIDER, records=RecordStore(store.db), clock_ms=wall_ms)
    peer_store = Store.open(tmp_path / "peer.db")
    peer = ReputationService(identity=CLIENT, records=RecordStore(peer_store.db), clock_ms=wall_ms)
    world = World(store=store, provider=provider, reputation=reputation, work_root=work_root, peer=peer)
    try:
        yield world
        trio.run(world.still_serves, clock=autojump_clock)
    finally:
        store.close()
        peer_store.close()


def sealed(identity: Identity, message: object, *, issued: int | None = None, ttl_ms: int = 60_000) -> bytes:
    now = wall_ms() if issued is None else issued
    return codec.encode(seal(identity, message, now=now, ttl_ms=ttl_ms, nonce=os.urandom(16)))


def signed_around(identity: Identity, payload: bytes, domain: str) -> bytes:
    """A validly signed envelope around arbitrary payload bytes (what a peer with a key can always send)."""
    fields = {
        "signer": identity.public_key,
        "domain": domain,
        "payload": payload,
        "issued_at": wall_ms(),
        "expires_at": wall_ms() + 60_000,
        "nonce": os.urandom(16),
    }
    signature = identity.sign(envelope._signing_bytes(**fields))  # type: ignore[arg-type]
    return codec.encode(Envelope(signature=signature, **fields))  # type: ignore[arg-type]


def quote_request(job_id: str, **changes: object) -> QuoteRequest:
    request = QuoteRequest(
        job_id=job_id,
        client=CLIENT.peer_id,
        resources=Resources(cpus=1, memory_bytes=64 << 20),
        limits=Limits(cpu_seconds=10, wall_seconds=10, memory_bytes=64 << 20),
        max_price=100_000,
        deadline=wall_ms() + 600_000,
    )
    return dataclasses.replace(request, **changes)


@dataclass
class Exchange:
    error: BaseException | None = None
    replies: list[bytes] = field(default_factory=list)


async def exchange(
    handler: Callable[[MemoryChannel], Awaitable[None]],
    frames: list[bytes],
    *,
    pair: Pair | None = None,
    close: bool = True,
) -> Exchange:
    """Serve one stream with ``handler`` while the peer sends ``frames``, then closes its side (or, with
    ``close=False``, goes silent). Returns what the handler raised (only ``ALLOWED`` is caught) and its replies."""
    pair = pair or channel_pair()
    result = Exchange()

    async def serve() -> None:
        try:
            await handler(pair.server)
        except ALLOWED as exc:
            result.error = exc
        finally:
            await pair.server.aclose()

    async def read() -> None:
        with contextlib.suppress(ChannelClosed):
            while True:
                result.replies.append(await pair.client.receive(MAX_FRAME_BYTES))

    with trio.fail_after(3600):  # virtual time: a hang fails the test instead of hanging it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            for frame in frames:
                try:
                    await pair.client.send(frame)
                except ChannelClosed:
                    break
            if close:
                await pair.finish_sending()
    return result


async def honest_negotiation(world: World, job_id: str | None = None) -> Agreement:
    request = quote_request(job_id or world.job_id())
    machine = ClientNegotiation(identity=CLIENT, request=request, provider=PROVIDER.peer_id)
    pair = channel_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(world.provider.rpc_negotiate, pair.server)
            actions = machine.start(wall_ms())
            while not machine.terminal:
                for action in actions:
                    if isinstance(action, Send):
                        await world.client.send(pair.client, action.message)
                if actions and isinstance(actions[-1], Quoted):
                    actions = machine.accept(wall_ms())
                    continue
                actions = machine.receive(
                    await world.client.receive(pair.client, (Quote, Reject, Agreement)), wall_ms()
                )
            await pair.client.aclose()
    assert isinstance(machine.outcome, Completed), machine.outcome
    return machine.outcome.agreement


def job_spec(agreement: Agreement, **changes: object) -> JobSpec:
    spec = JobSpec(
        job_id=agreement.job_id,
        client=CLIENT.peer_id,
        agreement_hash=terms_hash(agreement),
        command=("python3", "-c", "print(6*7)"),
        limits=agreement.limits,
    )
    return dataclasses.replace(spec, **changes)


async def client_job(world: World, agreement: Agreement) -> tuple[Reject | Receipt, bytes]:
    """Run a job as an honest client would: the provider's Reject, or the receipt we countersigned; and stdout."""
    pair = channel_pair()
    stdout = b""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(world.provider.rpc_job, pair.server)
            await world.client.send(pair.client, job_spec(agreement))
            answer = await world.client.receive(pair.client, (JobAccepted, Reject))
            if isinstance(answer, JobAccepted):
                while not isinstance(message := await world.client.receive(pair.client, (Chunk, JobResult)), JobResult):
                    stdout += message.data if message.kind is ChunkKind.STDOUT else b""
                answer = sign_as(CLIENT, await world.client.receive(pair.client, (Receipt,)), "client")
                await world.client.send(pair.client, answer)
            await pair.finish_sending()
    return answer, stdout


async def honest_job(world: World, agreement: Agreement) -> Receipt:
    both, stdout = await client_job(world, agreement)
    assert isinstance(both, Receipt), both
    assert stdout == b"42\n"
    row = world.store.get_job(agreement.job_id, "provider")
    assert row is not None
    assert row.state == "completed", row.error
    return both


def refused(result: Exchange) -> str:
    assert isinstance(result.error, RemoteProtocolError), result.error
    return result.error.code


def decodes_as(frame: bytes, expected: tuple[type, ...]) -> bool:
    try:
        codec.decode(frame, expected)
    except RemoteProtocolError:
        return False
    return True


def bundle(
    *,
    cost: int = 42,
    time: int | None = None,
    issued_at: int | None = None,
    rater: Identity = CLIENT,
    score: int = 100,
    outcome: Outcome = Outcome.SUCCESS,
    job_id: str = "rated",
) -> RecordBundle:
    """A record signed by one of two real identities, bound to a receipt both signed: any values they like."""
    now = NOW + int(trio.current_time() * 1000) if trio.lowlevel.in_trio_run() else NOW
    receipt = Receipt(
        job_id=job_id,
        client=CLIENT.peer_id,
        provider=PROVIDER.peer_id,
        agreement_hash=b"\x04" * 32,
        result_hash=b"\x05" * 32,
        usage=Usage(),
        cost=cost,
        issued_at=now if issued_at is None else issued_at,
    )
    receipt = sign_as(PROVIDER, sign_as(CLIENT, receipt, "client"), "provider")
    ratee = PROVIDER if rater is CLIENT else CLIENT
    record = ReputationRecord(
        rater=rater.peer_id,
        ratee=ratee.peer_id,
        receipt_hash=terms_hash(receipt),
        outcome=outcome,
        score=score,
        time=now if time is None else time,
    )
    return make_bundle(rater, record, receipt)


def one_node_market(tmp_path: Path, store: Store, provider_store: Store) -> JobManager:
    """A node that provides and runs its own jobs over loopback channels: the real JobManager (client side, on
    ``store``, replicas off) and ProviderService (as PROVIDER, on ``provider_store``, with the fake executor)."""
    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    provider = ProviderService(
        identity=PROVIDER,
        messenger=Messenger(PROVIDER, wall_ms),
        store=provider_store,
        executor=FakeExecutor(),  # type: ignore[arg-type]
        work_root=tmp_path / "work",
        price_sheet=FLOOR,
        capacity=lambda: (8, 16 << 30, 100 << 30, ()),
        max_concurrent=4,
        clock_ms=wall_ms,
    )

    async def find_providers(req: dict[str, Any]) -> list[str]:
        return [PROVIDER.peer_id]

    return JobManager(identity=PROVIDER, messenger=Messenger(PROVIDER, wall_ms), store=store, host=None,  # type: ignore[arg-type]
                      find_providers=find_providers, provider=provider, jobs_dir=tmp_path / "jobs",
                      clock_ms=wall_ms, replicas=1)  # fmt: skip


async def run_to_the_end(manager: JobManager, job_id: str) -> JobRow:
    """Wait until the job has ended and every task (the provider's side too) is blocked; the job's final row."""
    while (row := manager.store.get_job(job_id, "client")) is None or row.state not in TERMINAL:
        await manager.changed(job_id)
    await trio.testing.wait_all_tasks_blocked()
    return row
