"""Tests for GossipSub in node.net: a star of real hosts on 127.0.0.1, in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from node.net import (
    GOSSIP_INBOX_LEN,
    MAX_GOSSIP_BYTES,
    NetHost,
    TopicValidator,
    _Counters,
    _GossipInbox,
    open_host,
)
from protocol.identity import Identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TOPIC = "/coop-test/gossip/1.0.0"


def accept_all(source: str, data: bytes) -> bool:
    return True


@asynccontextmanager
async def open_star(validators: Sequence[TopicValidator]) -> AsyncIterator[list[NetHost]]:
    """One host per validator; every host after the first connects to the first (the hub) and to no other, so
    leaf-to-leaf messages must be forwarded by the hub. Yields once the hub and each leaf have each other in their
    meshes (event-driven: no polling)."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(seed=Identity.generate().seed(), listen=LOOPBACK, gossip_topics={TOPIC: validator})
            )
            for validator in validators
        ]
        hub, *leaves = hosts
        for leaf in leaves:
            await leaf.connect(hub.addrs()[0])
        for leaf in leaves:
            await hub.wait_gossip_peer(TOPIC, leaf.peer_id)
            await leaf.wait_gossip_peer(TOPIC, hub.peer_id)
        assert set(hub.gossip_peers(TOPIC)) == {leaf.peer_id for leaf in leaves}
        assert all(leaf.connected_peers() == [hub.peer_id] for leaf in leaves)
        yield hosts


async def test_a_message_reaches_every_host_through_its_validator() -> None:
    with trio.fail_after(15):
        seen: list[list[tuple[str, bytes]]] = [[] for _ in range(5)]

        def recorder(i: int) -> TopicValidator:
            def validator(source: str, data: bytes) -> bool:
                seen[i].append((source, data))
                return True

            return validator

        async with open_star([recorder(i) for i in range(5)]) as hosts:
            publisher = hosts[2]  # a leaf: reaching the other leaves takes a hop through the hub
            receivers = [h for h in hosts if h is not publisher]
            channels = [h.gossip_messages(TOPIC) for h in receivers]
            await publisher.publish(TOPIC, b"hello coop")

            for channel in channels:
                assert await channel.receive() == (publisher.peer_id, b"hello coop")
            assert all(s == [(publisher.peer_id, b"hello coop")] for s in seen)  # the publisher's own check too
            assert publisher.statistics().gossip_published == 1
            for host in receivers:
                stats = host.statistics()
                assert (stats.gossip_received, stats.gossip_rejected, stats.gossip_dropped) == (1, 0, 0)
            with pytest.raises(trio.WouldBlock):  # our own messages are not echoed back to us
                publisher.gossip_messages(TOPIC).receive_nowait()


async def test_rejected_messages_reach_nobody_and_are_counted() -> None:
    with trio.fail_after(15):
        refusals: list[bytes] = []
        all_refused = trio.Event()

        def leaf_validator(source: str, data: bytes) -> bool:
            if data in (b"bad", b"boom"):
                refusals.append(data)
                if len(refusals) == 2 * 4:
                    all_refused.set()
                if data == b"boom":
                    raise RuntimeError("a validator bug must count as a reject, not crash the router")
                return False
            return True

        async with open_star([accept_all] + [leaf_validator] * 4) as hosts:
            hub, *leaves = hosts
            channels = [leaf.gossip_messages(TOPIC) for leaf in leaves]
            for data in (b"bad", b"boom", b"good"):
                await hub.publish(TOPIC, data)

            for channel in channels:  # the first (and only) message anyone gets is the good one
                assert await channel.receive() == (hub.peer_id, b"good")
            await all_refused.wait()
            assert sorted(refusals) == [b"bad"] * 4 + [b"boom"] * 4
            for leaf, channel in zip(leaves, channels, strict=True):
                stats = leaf.statistics()
                assert (stats.gossip_received, stats.gossip_rejected) == (1, 2)
                with pytest.raises(trio.WouldBlock):
                    channel.receive_nowait()
            assert hub.statistics().gossip_published == 3


async def test_a_quick_burst_all_arrives() -> None:
    # Defaults dropped most of this (10 msgs/s per forwarder, 32-RPC queues, each message doubled by IDONTWANT).
    with trio.fail_after(15):
        async with open_star([accept_all] * 5) as hosts:
            publisher = hosts[1]  # a leaf, so the hub forwards all 30 within a second
            receivers = [h for h in hosts if h is not publisher]
            channels = [h.gossip_messages(TOPIC) for h in receivers]
            burst = {f"message {i}".encode() for i in range(30)}
            for data in sorted(burst):
                await publisher.publish(TOPIC, data)

            for channel in channels:
                got = {await channel.receive() for _ in burst}
                assert got == {(publisher.peer_id, data) for data in burst}
            assert all(h.statistics().gossip_dropped == 0 for h in receivers)


async def test_publish_refuses_bad_input() -> None:
    with trio.fail_after(15):

        def no_shouting(source: str, data: bytes) -> bool:
            return data != data.upper()

        seed = Identity.generate().seed()
        async with open_host(seed=seed, listen=LOOPBACK, gossip_topics={TOPIC: no_shouting}) as host:
            with pytest.raises(ValueError, match="exceeds"):
                await host.publish(TOPIC, b"x" * (MAX_GOSSIP_BYTES + 1))
            await host.publish(TOPIC, b"x" * MAX_GOSSIP_BYTES)  # no peers: best effort, no error
            with pytest.raises(ValueError, match="own validator"):
                await host.publish(TOPIC, b"HELLO")
            with pytest.raises(ValueError, match="not a gossip topic"):
                await host.publish("/coop-test/other/1.0.0", b"hello")
            with pytest.raises(ValueError, match="not a gossip topic"):
                host.gossip_messages("/coop-test/other/1.0.0")
            stats = host.statistics()
            assert (stats.gossip_published, stats.gossip_rejected) == (1, 1)

        async with open_host(seed=seed, listen=LOOPBACK) as plain:  # no gossip_topics: no GossipSub
            with pytest.raises(ValueError, match="not a gossip topic"):
                await plain.publish(TOPIC, b"hello")


async def test_a_full_inbox_drops_the_oldest() -> None:
    counters = _Counters()
    inbox = _GossipInbox(counters)
    for i in range(GOSSIP_INBOX_LEN + 3):
        inbox.put(("peer", str(i).encode()))
    inbox.close()
    async with inbox.receiver() as channel:
        got = [data async for _, data in channel]
    assert got == [str(i).encode() for i in range(3, GOSSIP_INBOX_LEN + 3)]
    assert counters.gossip_dropped == 3
