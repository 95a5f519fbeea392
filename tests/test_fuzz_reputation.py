"""Hostile peers on the reputation protocols: gossip, /coop/sync requests and pulls (see tests/test_fuzz_wire.py
for what every test here asserts)."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from node import net
from node.market.wire import ChannelClosed, StreamChannel
from protocol import codec
from protocol.cosign import sign_as
from protocol.envelope import Envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Outcome, Receipt, Usage
from protocol.reputation import REPUTATION_TOPIC, RecordBundle, SyncRequest, SyncResponse, verify_bundle
from tests.fuzz_world import (
    ALLOWED,
    CLIENT,
    FUZZ,
    PROVIDER,
    Exchange,
    bundle,
    decodes_as,
    exchange,
    quote_request,
    refused,
    sealed,
    wall_ms,
)

# ----------------------------------------------------------------------------------------------- reputation


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
