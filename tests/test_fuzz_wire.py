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
import os
from collections import Counter as Tally

import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st

from node.market.provider import RESERVATION_S, STEP_TIMEOUT_S
from node.market.wire import MAX_FRAME_BYTES, ChannelClosed
from protocol import codec, envelope
from protocol.cosign import sign_as, terms_hash
from protocol.envelope import Envelope, domain_of
from protocol.errors import LocalProtocolError, RemoteProtocolError
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
    PriceSheet,
    Quote,
    QuoteRequest,
    Receipt,
    ReceiptQuery,
    Reject,
    RejectCode,
    Resources,
)
from protocol.negotiation import agreement_for
from protocol.reputation import SyncRequest, SyncResponse
from tests.factories import all_messages
from tests.fuzz_world import (
    ALLOWED,
    CLIENT,
    FUZZ,
    MALLORY,
    NEGOTIATE_TYPES,
    Exchange,
    bundle,
    channel_pair,
    client_job,
    decodes_as,
    digest,
    exchange,
    honest_job,
    honest_negotiation,
    job_spec,
    quote_request,
    refused,
    sealed,
    signed_around,
    wall_ms,
)

# ----------------------------------------------------------------------------------------------- first frames


def first_frame(name: str) -> bytes:
    """A valid opening frame for each handler (signed where the protocol signs)."""
    if name == "negotiate":
        return sealed(CLIENT, quote_request("first-frame"))
    if name == "job":
        return sealed(
            CLIENT, JobSpec(job_id="first-frame", client=CLIENT.peer_id, agreement_hash=b"\x01" * 32, command=("true",))
        )
    if name == "receipt":
        return codec.encode(ReceiptQuery(job_id="first-frame"))
    return codec.encode(SyncRequest(since=0))


@FUZZ
@given(
    name=st.sampled_from(["negotiate", "job", "sync", "receipt"]),
    frames=st.lists(st.binary(max_size=512), min_size=1, max_size=4),
)
async def test_random_frames_are_refused(world, autojump_clock, name, frames):
    result = await exchange(world.handler(name), frames)
    if not decodes_as(frames[0], (SyncRequest, ReceiptQuery)):  # random bytes never carry a valid signature
        refused(result)
    world.check()


@FUZZ
@given(name=st.sampled_from(["negotiate", "job", "sync", "receipt"]), data=st.data())
async def test_mutated_valid_frames_are_refused_or_equal(world, autojump_clock, name, data):
    frame = bytearray(first_frame(name))
    original = codec.decode(bytes(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    result = await exchange(world.handler(name), [bytes(frame)])
    # msgpack has several encodings of one value (uint64 vs int64): such a mutation is the same message; and a
    # mutated (unsigned) sync request may well be another valid one.
    with contextlib.suppress(RemoteProtocolError):
        if codec.decode(bytes(frame)) == original or name in ("sync", "receipt"):
            codec.decode(bytes(frame), {"sync": SyncRequest, "receipt": ReceiptQuery}.get(name, Envelope))
            return
    refused(result)


@pytest.mark.parametrize("name", ["negotiate", "job", "sync", "receipt"])
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


@pytest.mark.parametrize("name", ["negotiate", "job", "sync", "receipt"])
async def test_valid_frames_of_the_wrong_type_are_refused(world, autojump_clock, name):
    opening = {"negotiate": NEGOTIATE_TYPES, "job": (JobSpec,), "sync": (SyncRequest,), "receipt": (ReceiptQuery,)}
    expected = opening[name]
    for type_name, frame in wrong_types():
        if any(type_name == t.TYPE for t in expected):
            continue
        code = refused(await exchange(world.handler(name), [frame]))
        assert code in {"unknown-type", "wrong-domain", "oversized"}, (type_name, code)
    world.check()


@pytest.mark.parametrize("name", ["negotiate", "job", "sync", "receipt"])
async def test_oversized_frames_are_refused(world, autojump_clock, name):
    frames = [b"\x93\x01" + b"\x00" * (MAX_FRAME_BYTES + 1)]  # over the channel's cap
    # under the channel's cap but over the cap of the type the (validly signed) frame names
    if name == "negotiate":
        frames.append(signed_around(CLIENT, codec.encode(quote_request("big")) + bytes(5000), domain_of(QuoteRequest)))
    elif name == "job":
        spec = JobSpec(job_id="big", client=CLIENT.peer_id, agreement_hash=bytes(32), command=("true",))
        frames.append(signed_around(CLIENT, codec.encode(spec) + bytes(257 << 10), domain_of(JobSpec)))
    elif name == "receipt":
        frames.append(codec.encode(ReceiptQuery(job_id="big")) + bytes(300))
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
