"""Fuzzing the real wire handlers in-process: ``ProviderService.rpc_negotiate`` / ``rpc_job``,
``ReputationService.rpc_sync``, the gossip validator and the pull path, over in-memory channels (no network) and a
fake executor that "runs" every job instantly (no sandbox, no process).

Invariants (docs style.md section 7):

* A handler either finishes or raises ``RemoteProtocolError`` (the stream adapter counts it by code and resets the
  stream), ``ChannelClosed`` or ``trio.TooSlowError`` (the stream is dropped). Never anything else.
* Every bad first frame (random, truncated, oversized, wrong type, forged, expired, replayed) is refused with a
  ``RemoteProtocolError``.
* Nothing is corrupted. The examples of a test share one provider (store, services, replay cache); after each one
  no job is left running or marked running and no work dir is left behind, and after the last one an honest
  negotiation (``ClientNegotiation``) and an honest job on fresh channels still complete, with a receipt signed by
  both (the ``world`` fixture checks it at teardown).

Signed-message time follows trio's clock (``autojump_clock``), so timeouts and expiry cost no wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from node import net
from node.market.provider import RESERVATION_S, STEP_TIMEOUT_S, ProviderService
from node.market.wire import LOOPBACK_BUFFER, MAX_FRAME_BYTES, ChannelClosed, MemoryChannel, Messenger, StreamChannel
from node.reputation.records import RecordStore
from node.reputation.service import ReputationService
from node.sandbox.spec import ExecResult, OutputFile, Tier
from node.sandbox.spec import Termination as SandboxTermination
from node.sandbox.spec import Usage as SandboxUsage
from node.store import Store
from protocol import codec, envelope
from protocol.cosign import sign_as, terms_hash
from protocol.envelope import Envelope, domain_of, seal
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.identity import Identity
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
    Limits,
    Outcome,
    PriceSheet,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    RejectCode,
    ReputationRecord,
    Resources,
    Usage,
)
from protocol.negotiation import ClientNegotiation, Completed, Quoted, Send, agreement_for
from protocol.reputation import (
    REPUTATION_TOPIC,
    RecordBundle,
    SyncRequest,
    SyncResponse,
    make_bundle,
    verify_bundle,
)
from tests.factories import NOW, all_messages

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


# ----------------------------------------------------------------------------------------------- first frames


def first_frame(name: str) -> bytes:
    """A valid opening frame for each handler (signed where the protocol signs)."""
    if name == "negotiate":
        return sealed(CLIENT, quote_request("first-frame"))
    if name == "job":
        return sealed(
            CLIENT, JobSpec(job_id="first-frame", client=CLIENT.peer_id, agreement_hash=b"\x01" * 32, command=("true",))
        )
    return codec.encode(SyncRequest(since=0))


def decodes_as(frame: bytes, expected: tuple[type, ...]) -> bool:
    try:
        codec.decode(frame, expected)
    except RemoteProtocolError:
        return False
    return True


@FUZZ
@given(
    name=st.sampled_from(["negotiate", "job", "sync"]), frames=st.lists(st.binary(max_size=512), min_size=1, max_size=4)
)
async def test_random_frames_are_refused(world, autojump_clock, name, frames):
    result = await exchange(world.handler(name), frames)
    if not decodes_as(frames[0], (SyncRequest,)):  # random bytes never carry a valid signature
        refused(result)
    world.check()


@FUZZ
@given(name=st.sampled_from(["negotiate", "job", "sync"]), data=st.data())
async def test_mutated_valid_frames_are_refused_or_equal(world, autojump_clock, name, data):
    frame = bytearray(first_frame(name))
    original = codec.decode(bytes(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    result = await exchange(world.handler(name), [bytes(frame)])
    # msgpack has several encodings of one value (uint64 vs int64): such a mutation is the same message; and a
    # mutated (unsigned) sync request may well be another valid one.
    with contextlib.suppress(RemoteProtocolError):
        if codec.decode(bytes(frame)) == original or name == "sync":
            codec.decode(bytes(frame), SyncRequest if name == "sync" else Envelope)
            return
    refused(result)


@pytest.mark.parametrize("name", ["negotiate", "job", "sync"])
async def test_every_truncation_of_a_valid_frame_is_refused(world, autojump_clock, name):
    frame = first_frame(name)
    codes = Tally()
    for end in range(len(frame)):
        codes[refused(await exchange(world.handler(name), [frame[:end]]))] += 1
    assert codes.total() == len(frame)  # each one refused, so each one counted by the stream adapter
    assert set(codes) <= {"malformed", "oversized", "unknown-type"}
    world.check()


def wrong_types() -> list[tuple[str, bytes]]:
    """Every message type, signed by the channel's peer where it has a signer, as the opening frame."""
    out = []
    for message in all_messages():
        signer = getattr(type(message), "SIGNER", None)
        if signer is None:
            out.append((type(message).TYPE, codec.encode(message)))
        else:
            out.append((type(message).TYPE, sealed(CLIENT, dataclasses.replace(message, **{signer: CLIENT.peer_id}))))
    rated = bundle()
    for extra in (rated, SyncRequest(since=0), SyncResponse(bundles=(rated,), more=False)):
        out.append((type(extra).TYPE, codec.encode(extra)))
    return out


@pytest.mark.parametrize("name", ["negotiate", "job", "sync"])
async def test_valid_frames_of_the_wrong_type_are_refused(world, autojump_clock, name):
    expected = {"negotiate": NEGOTIATE_TYPES, "job": (JobSpec,), "sync": (SyncRequest,)}[name]
    for type_name, frame in wrong_types():
        if any(type_name == t.TYPE for t in expected):
            continue
        code = refused(await exchange(world.handler(name), [frame]))
        assert code in {"unknown-type", "wrong-domain", "oversized"}, (type_name, code)
    world.check()


@pytest.mark.parametrize("name", ["negotiate", "job", "sync"])
async def test_oversized_frames_are_refused(world, autojump_clock, name):
    frames = [b"\x93\x01" + b"\x00" * (MAX_FRAME_BYTES + 1)]  # over the channel's cap
    # under the channel's cap but over the cap of the type the (validly signed) frame names
    if name == "negotiate":
        frames.append(signed_around(CLIENT, codec.encode(quote_request("big")) + bytes(5000), domain_of(QuoteRequest)))
    elif name == "job":
        spec = JobSpec(job_id="big", client=CLIENT.peer_id, agreement_hash=bytes(32), command=("true",))
        frames.append(signed_around(CLIENT, codec.encode(spec) + bytes(257 << 10), domain_of(JobSpec)))
    else:
        frames.append(codec.encode(SyncRequest(since=0)) + bytes(300))
    for frame in frames:
        assert refused(await exchange(world.handler(name), [frame])) == "oversized"
    world.check()


# ----------------------------------------------------------------------------------------------- envelopes


async def test_forged_expired_future_and_replayed_envelopes_are_refused(world, autojump_clock):
    negotiate = world.provider.rpc_negotiate
    request = quote_request("env-1")
    cases = {
        "wrong-signer": [sealed(MALLORY, dataclasses.replace(request, client=MALLORY.peer_id))],
        "expired": [sealed(CLIENT, request, issued=wall_ms() - 3_600_000)],
        "future-dated": [sealed(CLIENT, request, issued=wall_ms() + 3_600_000)],
        "wrong-domain": [signed_around(CLIENT, codec.encode(request), domain_of(JobSpec))],
        "unknown-type": [signed_around(CLIENT, codec.encode(request), domain_of(Accept))],  # payload is not its domain
    }
    good = codec.decode(sealed(CLIENT, request), Envelope)
    cases["bad-signature"] = [codec.encode(dataclasses.replace(good, signature=bytes(64)))]
    cases["tampered"] = [codec.encode(dataclasses.replace(good, issued_at=good.issued_at + 1))]
    for code, frames in cases.items():
        assert refused(await exchange(negotiate, frames)) == code.replace("tampered", "bad-signature")
    # Mallory, on her own stream, signs a request that names the client: the signer is not the message's
    claims_client = signed_around(MALLORY, codec.encode(request), domain_of(QuoteRequest))
    assert refused(await exchange(negotiate, [claims_client], pair=channel_pair(MALLORY.peer_id))) == "wrong-signer"
    # a replay: the same bytes on a second stream
    frame = sealed(CLIENT, quote_request("env-2"))
    first = await exchange(negotiate, [frame])
    assert first.error is None
    codec.decode(first.replies[0], Envelope)  # the quote
    assert refused(await exchange(negotiate, [frame])) == "replayed"
    world.check()


# ----------------------------------------------------------------------------------------------- negotiation


sheets = st.builds(
    PriceSheet,
    **{k: st.integers(0, 1 << 40) for k in ("start_fee", "per_cpu_second", "per_gib_second", "per_gpu_second")},
)
requests = st.builds(
    quote_request,
    job_id=st.just("fuzz"),
    resources=st.builds(
        Resources,
        cpus=st.integers(1, 4096),
        memory_bytes=st.integers(0, (1 << 64) - 1),
        disk_bytes=st.integers(0, (1 << 64) - 1),
        gpus=st.integers(0, 64),
        gpu_model=st.text(max_size=8),
    ),
    limits=st.builds(
        Limits,
        cpu_seconds=st.integers(1, 4096 * 7 * 86400),
        wall_seconds=st.integers(1, 7 * 86400),
        memory_bytes=st.integers(0, (1 << 64) - 1),
    ),
    max_price=st.integers(0, (1 << 64) - 1),
    deadline=st.integers(0, (1 << 64) - 1),
)
# The moves of a hostile client, weighted towards the ones that make progress so that deals do get done.
MOVES = (
    ["request"] * 4
    + ["accept"] * 4
    + ["counter"] * 2
    + [
        "fuzzed-request",
        "accept-bad-signature",
        "foreign-accept",
        "reject",
        "replay",
        "garbage",
        "wrong-type",
        "sleep",
        "silence",
    ]
)


@FUZZ
@given(data=st.data())
async def test_out_of_order_negotiation_messages(world, autojump_clock, data):
    """A client sending valid (and invalid) negotiation messages in any order, at any time."""
    job_id = world.job_id()
    request = quote_request(job_id)
    pair = channel_pair()
    sent: list[bytes] = []
    quote: Quote | None = None
    outcome = Exchange()

    async def serve() -> None:
        try:
            await world.provider.rpc_negotiate(pair.server)
        except ALLOWED as exc:
            outcome.error = exc
        finally:
            await pair.server.aclose()

    async def answer() -> object | None:
        try:
            return await world.client.receive(pair.client, (Quote, Reject, Agreement))
        except ChannelClosed:
            return None

    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for move in data.draw(st.lists(st.sampled_from(MOVES), min_size=1, max_size=6)):
                frame = None
                if move == "request":
                    frame = sealed(CLIENT, request)
                elif move == "fuzzed-request":
                    request = dataclasses.replace(data.draw(requests), job_id=job_id)
                    frame = sealed(CLIENT, request)
                elif move == "counter":
                    last = quote.round if quote else 0
                    frame = sealed(
                        CLIENT,
                        Counter(
                            job_id=job_id,
                            client=CLIENT.peer_id,
                            price_sheet=data.draw(sheets),
                            quote_hash=envelope.message_hash(quote) if quote else b"\x02" * 32,
                            round=data.draw(st.sampled_from([last + 1, last, 16])),
                        ),
                    )
                elif move in ("accept", "accept-bad-signature", "foreign-accept") and quote is not None:
                    terms = sign_as(CLIENT, agreement_for(request, quote), "client")
                    signature = terms.client_signature if move != "accept-bad-signature" else os.urandom(64)
                    accept = Accept(
                        job_id=job_id if move != "foreign-accept" else "other",
                        client=CLIENT.peer_id,
                        quote_hash=envelope.message_hash(quote),
                        client_signature=signature,
                    )
                    frame = sealed(CLIENT, accept)
                elif move == "reject":
                    frame = sealed(CLIENT, Reject(job_id=job_id, peer=CLIENT.peer_id, code=RejectCode.WITHDRAWN))
                elif move == "replay" and sent:
                    frame = data.draw(st.sampled_from(sent))
                elif move == "garbage":
                    frame = data.draw(st.binary(max_size=64))
                elif move == "wrong-type":
                    frame = data.draw(st.sampled_from(wrong_types()))[1]
                elif move == "sleep":
                    await trio.sleep(data.draw(st.integers(0, 40)))
                    continue
                elif move == "silence":
                    await trio.sleep(STEP_TIMEOUT_S + 1)  # the provider gives up on us
                    continue
                if frame is None:
                    continue
                sent.append(frame)
                try:
                    await pair.client.send(frame)
                except ChannelClosed:
                    break
                reply = await answer()
                if reply is None:
                    break
                if isinstance(reply, Quote):
                    quote = reply
                event(f"provider answered {type(reply).__name__}")
                if isinstance(reply, Agreement):  # a completed deal is stored and verifiable
                    stored = world.store.get_agreement(terms_hash(reply))
                    assert stored is not None
                    assert stored.agreement == reply
            await pair.client.aclose()
    await trio.sleep(RESERVATION_S)  # let reservations made by completed deals lapse (virtual time)
    world.check()


# ----------------------------------------------------------------------------------------------- job transfer


CHUNK_MOVES = [
    "right",
    "wrong-job",
    "wrong-kind",
    "wrong-name",
    "too-much",
    "corrupt",
    "garbage",
    "signed-chunk",
    "close",
    "silence",
]
RECEIPT_MOVES = ["countersign", "tamper", "bad-signature", "reject", "garbage", "close", "silence"]
# Short ASCII names: names past 250 bytes hit a known provider bug (test_a_long_input_name_is_refused_...).
names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"), min_size=1, max_size=40
).filter(lambda n: n not in (".", ".."))


@FUZZ
@given(data=st.data())
async def test_hostile_job_transfers(world, autojump_clock, data):
    """After a real agreement: bad specs, then bad input chunks, then bad answers to the receipt."""
    agreement = await honest_negotiation(world)
    files = data.draw(st.dictionaries(names, st.binary(max_size=2048), max_size=3))
    inputs = tuple(FileRef(name=n, sha256=digest(d), size=len(d)) for n, d in files.items())
    outputs = tuple(data.draw(st.lists(names, max_size=2, unique=True)))
    spec = job_spec(agreement, inputs=inputs, outputs=outputs)
    bad_spec = data.draw(st.sampled_from([None, "other-agreement", "other-limits", "gpus", "other-job"]))
    if bad_spec is not None:
        changes = {
            "other-agreement": {"agreement_hash": b"\x03" * 32},
            "other-limits": {"limits": Limits()},
            "gpus": {"gpus": 1},
            "other-job": {"job_id": "other"},
        }[bad_spec]
        result = await exchange(world.provider.rpc_job, [sealed(CLIENT, dataclasses.replace(spec, **changes))])
        assert result.error is None
        reject = codec.decode(codec.decode(result.replies[0], Envelope).payload, Reject)
        assert reject.code in (RejectCode.UNKNOWN_AGREEMENT, RejectCode.BAD_REQUEST)
    pair = channel_pair()
    outcome = Exchange()
    replies_send, replies = trio.open_memory_channel[object](1000)

    async def serve() -> None:
        try:
            await world.provider.rpc_job(pair.server)
        except ALLOWED as exc:
            outcome.error = exc
        finally:
            await pair.server.aclose()

    async def read() -> None:
        async with replies_send:
            with contextlib.suppress(ChannelClosed):
                while True:
                    await replies_send.send(
                        await world.client.receive(pair.client, (Chunk, JobAccepted, JobResult, Receipt, Reject))
                    )

    async def next_reply() -> object | None:
        async for reply in replies:
            if not (isinstance(reply, Chunk) and reply.kind in (ChunkKind.HEARTBEAT, ChunkKind.STDOUT)):
                return reply
        return None

    async def send(frame: bytes) -> bool:
        try:
            await pair.client.send(frame)
        except ChannelClosed:
            return False
        return True

    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            await send(sealed(CLIENT, spec))
            accepted = await next_reply()
            assert isinstance(accepted, JobAccepted), accepted
            for ref in inputs:
                move = data.draw(st.sampled_from(CHUNK_MOVES))
                body = files[ref.name]
                chunk = Chunk(job_id=spec.job_id, kind=ChunkKind.INPUT, name=ref.name, data=body)
                if move == "wrong-job":
                    chunk = dataclasses.replace(chunk, job_id="other")
                elif move == "wrong-kind":
                    chunk = dataclasses.replace(chunk, kind=ChunkKind.OUTPUT)
                elif move == "wrong-name":
                    chunk = dataclasses.replace(chunk, name=ref.name + "x")
                elif move == "too-much":
                    chunk = dataclasses.replace(chunk, data=body + b"!")
                elif move == "corrupt":
                    chunk = dataclasses.replace(chunk, data=bytes(len(body)) if body else b"?")
                frame = {
                    "garbage": data.draw(st.binary(max_size=64)),
                    "signed-chunk": sealed(
                        CLIENT, Reject(job_id=spec.job_id, peer=CLIENT.peer_id, code=RejectCode.BAD_INPUT)
                    ),
                }.get(move, codec.encode(chunk))
                if move == "close":
                    await pair.finish_sending()
                    break
                if move == "silence":
                    break  # the provider's step timeout ends it
                if not await send(frame):
                    break
            while (reply := await next_reply()) is not None and not isinstance(reply, Receipt | Reject):
                pass
            if isinstance(reply, Receipt):
                receipt = reply
                move = data.draw(st.sampled_from(RECEIPT_MOVES))
                both = sign_as(CLIENT, receipt, "client")
                answer = {
                    "countersign": codec.encode(both),
                    "tamper": codec.encode(
                        sign_as(CLIENT, dataclasses.replace(receipt, cost=receipt.cost + 1), "client")
                    ),
                    "bad-signature": codec.encode(dataclasses.replace(both, client_signature=os.urandom(64))),
                    "reject": sealed(
                        CLIENT, Reject(job_id=spec.job_id, peer=CLIENT.peer_id, code=RejectCode.BAD_RESULT)
                    ),
                    "garbage": data.draw(st.binary(max_size=64)),
                }.get(move)
                if answer is not None:
                    await send(answer)
                if move != "silence":  # silence: the provider's receipt timeout ends it
                    await pair.finish_sending()
    row = world.store.get_job(spec.job_id, "provider")
    event(f"provider ended with {type(outcome.error).__name__}, job {row.state if row else None}")
    assert row is not None
    assert row.state in ("completed", "failed", "cancelled")
    assert (row.state == "completed") == (world.store.get_receipt(spec.job_id) is not None)
    world.check()


async def test_a_spec_for_a_used_agreement_is_refused_and_the_slot_freed(world, autojump_clock):
    agreement = await honest_negotiation(world)
    await honest_job(world, agreement)
    result = await exchange(world.provider.rpc_job, [sealed(CLIENT, job_spec(agreement))])
    reject = codec.decode(codec.decode(result.replies[0], Envelope).payload, Reject)
    assert reject.code is RejectCode.AGREEMENT_USED
    assert world.provider.jobs_refused == 1
    world.check()


async def test_a_long_input_name_is_refused_not_an_internal_error(world, autojump_clock):
    """NAME_MAX is 255 bytes and the provider stages an input as NAME + ".part": a name may have 250 UTF-8 bytes.
    A 251-byte name used to reach the file system (OSError, an internal error) instead of being refused."""
    with pytest.raises(LocalProtocolError):
        FileRef(name="\u00e9" * 125 + "n", sha256=digest(b"x"), size=1)  # 125 characters, 251 bytes
    agreement = await honest_negotiation(world)
    name = "n" * 250
    spec = job_spec(agreement, inputs=(FileRef(name=name, sha256=digest(b"x"), size=1),))
    payload = codec.encode(spec)
    longer = payload.replace(b"\xd9\xfa" + name.encode(), b"\xd9\xfb" + name.encode() + b"n")  # str8 of 251
    assert longer != payload
    result = await exchange(world.provider.rpc_job, [signed_around(CLIENT, longer, domain_of(JobSpec))])
    assert refused(result) == "malformed"


async def test_a_reused_job_id_does_not_break_the_provider(world, autojump_clock):
    first = await honest_job(world, await honest_negotiation(world, "same-id"))
    await trio.sleep(1)  # else the very same terms are agreed again: that agreement is used already
    second, _ = await client_job(world, await honest_negotiation(world, "same-id"))
    assert isinstance(second, Reject), second
    assert second.code is RejectCode.BAD_REQUEST
    assert "already ran here" in second.message
    stored = world.store.get_receipt("same-id")
    assert stored is not None
    assert stored.receipt == first


# ----------------------------------------------------------------------------------------------- reputation


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


hostile_bundles = st.builds(
    bundle,
    cost=st.integers(0, (1 << 64) - 1),
    time=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
    issued_at=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
    rater=st.sampled_from([CLIENT, PROVIDER]),
    score=st.integers(0, 100),
    outcome=st.sampled_from(Outcome),
    job_id=st.sampled_from(["r1", "r2", "r3"]),
)


class FakeGossipHost:
    """What consume_gossip and rate need of the host: the messages our validator let through."""

    def __init__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages = messages

    async def gossip_messages(self, topic: str) -> AsyncIterator[tuple[str, bytes]]:
        assert topic == REPUTATION_TOPIC
        for message in self.messages:
            yield message

    async def publish(self, topic: str, data: bytes) -> None:
        pass


@FUZZ
@given(items=st.lists(st.one_of(hostile_bundles.map(codec.encode), st.binary(max_size=256)), max_size=8))
async def test_gossip_is_validated_counted_and_stored_without_crashing(world, autojump_clock, items):
    service = world.reputation
    before = sum(service.rejected.values())
    passed = [("peer", data) for data in items if service.validate_gossip("peer", data)]
    assert sum(service.rejected.values()) - before == len(items) - len(passed)  # every refusal counted
    service.host = FakeGossipHost(passed)  # type: ignore[assignment]
    await service.consume_gossip()  # what the validator accepted can be stored (it used to crash the node)
    service.table()  # and trust computed from it
    world.check()


@FUZZ
@given(
    frames=st.lists(
        st.one_of(
            st.builds(
                SyncRequest,
                since=st.integers(0, (1 << 64) - 1),
                after_id=st.sampled_from([b"", b"\x00" * 32, b"\xff" * 32]),
                limit=st.integers(1, 500),
            ).map(codec.encode),
            st.binary(max_size=300),
        ),
        min_size=1,
        max_size=5,
    )
)
async def test_sync_requests(world, autojump_clock, frames):
    world.reputation.records.put(verify_bundle(bundle(), now=wall_ms()), received_ms=wall_ms())
    result = await exchange(world.reputation.rpc_sync, frames)
    valid = list(itertools.takewhile(lambda f: decodes_as(f, (SyncRequest,)), frames))
    assert len(result.replies) == len(valid)
    for reply in result.replies:
        codec.decode(reply, SyncResponse)
    if len(valid) < len(frames):
        refused(result)


async def test_a_sync_request_from_the_far_future_gets_an_empty_page(world, autojump_clock):
    """since = 2**64 - 1 used to raise OverflowError in SQLite (an internal error, not a refusal)."""
    world.reputation.records.put(verify_bundle(bundle(), now=wall_ms()), received_ms=wall_ms())
    result = await exchange(world.reputation.rpc_sync, [codec.encode(SyncRequest(since=(1 << 64) - 1))])
    assert result.error is None
    assert codec.decode(result.replies[0], SyncResponse) == SyncResponse(bundles=(), more=False)


class PipeStream:
    """One end of an in-memory byte stream with NetStream's interface, so the real StreamChannel and
    net.send_frame / receive_frame run over it; writes are cut into pieces of at most ``dribble`` bytes."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        remote_peer: str,
        dribble: int,
    ) -> None:
        self._send, self._receive, self.remote_peer, self.protocol = send, receive, remote_peer, "/fuzz"
        self._buffer = b""
        self._dribble = dribble
        self._counters = type("Counters", (), {"frames_too_large": 0})()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                self._buffer += await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
                raise net.StreamClosed("ended") from exc
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    async def write(self, data: bytes) -> None:
        try:
            for start in range(0, len(data), self._dribble):
                await self._send.send(data[start : start + self._dribble])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise net.StreamClosed("broken") from exc

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()

    _reset_shielded = reset


def pipe(dribble: int) -> tuple[PipeStream, PipeStream]:
    """(the provider's end, naming the client; the client's end, naming the provider)."""
    a_send, b_recv = trio.open_memory_channel[bytes](1 << 20)
    b_send, a_recv = trio.open_memory_channel[bytes](1 << 20)
    return PipeStream(a_send, a_recv, CLIENT.peer_id, dribble), PipeStream(b_send, b_recv, PROVIDER.peer_id, dribble)


class FakeSyncHost:
    """open_stream() hands pull_from one end of a pipe; ``serve`` answers on the other."""

    def __init__(self, nursery: trio.Nursery, serve: Callable[[StreamChannel], Awaitable[None]], dribble: int) -> None:
        self.nursery, self.serve, self.dribble = nursery, serve, dribble

    async def open_stream(self, peer: str, protocol: str) -> PipeStream:
        ours, theirs = pipe(self.dribble)
        self.nursery.start_soon(self._serve, StreamChannel(theirs))  # type: ignore[arg-type]
        return ours

    async def _serve(self, channel: StreamChannel) -> None:
        with contextlib.suppress(*ALLOWED):
            await self.serve(channel)


SYNC_ANSWERS = ["honest", "garbage", "huge-announce", "truncated", "bad-bundles", "endless-more", "silence"]


@FUZZ
@given(
    answers=st.lists(st.sampled_from(SYNC_ANSWERS), min_size=1, max_size=3),
    dribble=st.integers(1, 4096),
    hostile=st.lists(hostile_bundles, max_size=3),
)
async def test_pulling_from_a_hostile_peer(world, autojump_clock, answers, dribble, hostile):
    """pull_from against peers answering anything: it raises only what sync_forever catches."""
    honest_peer = world.peer
    honest_peer.records.put(verify_bundle(bundle(job_id="pulled"), now=wall_ms()), received_ms=wall_ms())

    async def hostile_peer(channel: StreamChannel) -> None:
        for answer in answers:
            if answer == "honest":
                return await honest_peer.rpc_sync(channel)
            await channel.receive(SyncRequest.MAX_BYTES)
            if answer == "silence":
                return await trio.sleep_forever()
            frame = {
                "garbage": os.urandom(40),
                "bad-bundles": codec.encode(SyncResponse(bundles=tuple(hostile), more=False)),
                "endless-more": codec.encode(SyncResponse(bundles=(bundle(job_id="more"),), more=True)),
            }.get(answer, b"")
            if answer == "huge-announce":
                return await channel.stream.write((1 << 31).to_bytes(4, "big"))
            if answer == "truncated":
                return await channel.stream.write((100).to_bytes(4, "big") + b"\x93\x01")
            await channel.send(frame)

    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            world.reputation.host = FakeSyncHost(nursery, hostile_peer, dribble)  # type: ignore[assignment]
            # what sync_forever catches; anything else would end the node
            with contextlib.suppress(net.NetError, ChannelClosed, trio.TooSlowError, RemoteProtocolError):
                await world.reputation.pull_from(CLIENT.peer_id)
            nursery.cancel_scope.cancel()
    world.reputation.table()


async def test_a_record_costing_more_than_sqlite_holds_is_refused_on_every_path(world, autojump_clock):
    """Two colluding identities can sign a receipt costing 2**64 - 1. The validator used to accept (and forward)
    it, and storing it raised OverflowError in consume_gossip / pull_from: a crash of every node that got it."""
    service = world.reputation
    data = codec.encode(bundle(cost=(1 << 64) - 1))
    assert not service.validate_gossip("peer", data)
    assert service.rejected == {"malformed": 1}
    service.host = FakeGossipHost([("peer", data)])  # type: ignore[assignment]
    await service.consume_gossip()
    response = codec.encode(SyncResponse(bundles=(codec.decode(data, RecordBundle),), more=False))

    async def peer(channel: StreamChannel) -> None:
        await channel.receive(SyncRequest.MAX_BYTES)
        await channel.send(response)

    async with trio.open_nursery() as nursery:
        service.host = FakeSyncHost(nursery, peer, 4096)  # type: ignore[assignment]
        assert await service.pull_from(CLIENT.peer_id) == 0
    assert service.rejected == {"malformed": 3}
    assert service.records.count() == 0


# Found by scripts/fuzz/wire.py (atheris): msgpack lets map keys be bytes as well as str, and the codec sorts the
# unknown ones for its error message. A sync request or response with one unknown key of each kind raised TypeError.
MIXED_KEYS = msgpack.packb([1, "sync-request", {"since": 0, "a": 1, b"b": 1}], use_bin_type=True)
MIXED_KEYS_RESPONSE = msgpack.packb(
    [1, "sync-response", {"bundles": [], "more": False, "a": 1, b"b": 1}], use_bin_type=True
)


async def test_a_map_with_both_str_and_bytes_keys_is_malformed(world, autojump_clock):
    assert refused(await exchange(world.reputation.rpc_sync, [MIXED_KEYS])) == "malformed"

    async def peer(channel: StreamChannel) -> None:
        await channel.receive(SyncRequest.MAX_BYTES)
        await channel.send(MIXED_KEYS_RESPONSE)

    async with trio.open_nursery() as nursery:
        world.reputation.host = FakeSyncHost(nursery, peer, 4096)  # type: ignore[assignment]
        with pytest.raises(RemoteProtocolError):  # what sync_forever catches
            await world.reputation.pull_from(CLIENT.peer_id)


async def test_rating_a_job_a_node_ran_for_itself_rates_nobody(world, autojump_clock):
    """The provider's receipt hook rates the client. For a job a node ran for itself that raised LocalProtocolError
    (a record cannot name its rater twice) out of the loopback stream, and the node stopped."""
    receipt = Receipt(
        job_id="self",
        client=PROVIDER.peer_id,
        provider=PROVIDER.peer_id,
        agreement_hash=bytes(32),
        result_hash=bytes(32),
        usage=Usage(),
        cost=1,
        issued_at=wall_ms(),
    )
    receipt = sign_as(PROVIDER, sign_as(PROVIDER, receipt, "client"), "provider")
    world.reputation.host = FakeGossipHost([])  # type: ignore[assignment]
    assert await world.reputation.rate(receipt=receipt, outcome=Outcome.SUCCESS, score=100) is None
    assert world.reputation.records.count() == 0


async def test_a_frame_dribbled_byte_by_byte_is_served_and_every_cut_is_dropped(world, autojump_clock):
    """The real StreamChannel over a byte stream: one byte at a time works; a stream cut anywhere is dropped."""
    frame = sealed(CLIENT, quote_request("dribble"))
    wire = len(frame).to_bytes(4, "big") + frame

    async def run(data: bytes) -> Exchange:
        provider_end, client_end = pipe(1)
        await client_end.write(data)  # one byte per read on the provider's side
        await client_end.close()
        result = Exchange()
        with trio.fail_after(3600):
            try:
                await world.provider.rpc_negotiate(StreamChannel(provider_end))  # type: ignore[arg-type]
            except ALLOWED as exc:
                result.error = exc
            finally:
                await provider_end.close()  # as the stream adapter does
        with contextlib.suppress(net.StreamClosed):
            while True:
                result.replies.append(await client_end.read_exactly(int.from_bytes(await client_end.read_exactly(4))))
        return result

    whole = await run(wire)
    assert whole.error is None
    codec.decode(whole.replies[0], Envelope)  # the quote
    for cut in range(0, len(wire), 7):
        result = await run(wire[:cut])
        assert result.error is None or isinstance(result.error, ChannelClosed | RemoteProtocolError), result.error
    assert refused(await run((1 << 30).to_bytes(4, "big"))) == "oversized"
    world.check()
