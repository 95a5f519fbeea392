"""GossipSub for the libp2p adapter (see node/net/__init__.py for the rules and the knobs)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import final

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import PriorityQueue, RpcQueue
from libp2p.tools.anyio_service import background_trio_service

from node.net.common import (
    _GOSSIP_DEGREE,
    _GOSSIP_DEGREE_HIGH,
    _GOSSIP_DEGREE_LOW,
    _GOSSIP_HEARTBEAT_S,
    _GOSSIP_PRUNE_BACKOFF_S,
    _GOSSIP_RATE_PER_S,
    GOSSIP_INBOX_LEN,
    GOSSIP_PEER_QUEUE_LEN,
    TopicValidator,
    _Counters,
)

logger = logging.getLogger("node.net")

# GossipSub (private helpers)
#
# Theory of operation: given ``gossip_topics``, open_host runs one ``_Gossip``: a GossipSub router and our Pubsub
# subclass. An inbound message goes through libp2p's ``Pubsub.push_msg``: signature check (strict signing, so the
# ``from`` peer is authenticated) -> ``_Gossip.validate`` (registered per topic; libp2p caches each verdict by
# message id, so it runs once per message) -> duplicate check -> ``_CoopPubsub.notify_subscriptions`` (overridden
# to put ``(source, data)`` into the topic's ``_GossipInbox``) -> the router forwards it to its mesh. Rejected
# messages are neither delivered nor forwarded. ``NetHost.publish`` validates our own message first, then hands it
# to the same path; it is not echoed into our own inbox, and ``_CoopGossipSub`` sends it to every peer in the topic.
# The three subclasses override one hook each; they depend on 0.8.1 internals, so recheck them on an upgrade.


@final
class _RoomyQueues(dict[ID, RpcQueue]):
    """``Pubsub.peer_queues`` that enlarges each per-peer outbound queue as libp2p stores it: 0.8.1 builds them
    with a fixed 32 RPCs and has no option for it."""

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        inner = getattr(queue, "_queue", None)
        if isinstance(inner, PriorityQueue):
            inner.max_size = GOSSIP_PEER_QUEUE_LEN
        else:  # pragma: no cover - guards a libp2p change; the queue then keeps its default size
            logger.warning("cannot resize libp2p's pubsub queue (%r): bursts may be dropped", type(inner))
        super().__setitem__(peer_id, queue)


@final
class _CoopGossipSub(GossipSub):
    """GossipSub that floods our own messages to every peer in the topic, as go-libp2p does by default
    (``floodPublish``): 0.8.1 sends them to the mesh only, so a node its peers had just pruned published nothing."""

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterable[ID]:
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and msg_forwarder == origin == self.pubsub.my_id:
            for topic in topic_ids:
                peers.update(p for p in self.pubsub.peer_topics.get(topic, ()) if p in self.peer_protocol)
        return peers


@final
class _CoopPubsub(Pubsub):
    """Pubsub with strict signing, larger outbound queues, and accepted messages handed to ``deliver``."""

    def __init__(
        self, host: IHost, router: GossipSub, topics: frozenset[str], deliver: Callable[[rpc_pb2.Message], None]
    ) -> None:
        super().__init__(host, router, strict_signing=True, allowed_topics=topics)
        self.peer_queues = _RoomyQueues()
        self._deliver = deliver

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        # libp2p puts the message into a 32-entry channel per subscription and drops it if that is full.
        self._deliver(publish_message)


@final
class _GossipInbox:
    """A topic's bounded queue of accepted messages; when full, the oldest is dropped (and counted)."""

    def __init__(self, counters: _Counters) -> None:
        self._counters = counters
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](GOSSIP_INBOX_LEN)

    def put(self, item: tuple[str, bytes]) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._receive.receive_nowait()  # full, so it holds an item; we keep a receiver, so never broken
            self._counters.gossip_dropped += 1
            self._send.send_nowait(item)
        except trio.ClosedResourceError:
            pass  # shutting down

    def receiver(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        return self._receive.clone()

    def close(self) -> None:
        self._send.close()


@final
class _Gossip:
    """One host's GossipSub router, Pubsub and per-topic inboxes and validators."""

    def __init__(self, host: IHost, topics: Mapping[str, TopicValidator], counters: _Counters) -> None:
        self._my_id = host.get_id()
        self._validators = dict(topics)
        self._counters = counters
        self.inboxes = {topic: _GossipInbox(counters) for topic in topics}
        self.router = _CoopGossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=_GOSSIP_DEGREE,
            degree_low=_GOSSIP_DEGREE_LOW,
            degree_high=_GOSSIP_DEGREE_HIGH,
            heartbeat_interval=_GOSSIP_HEARTBEAT_S,
            prune_back_off=_GOSSIP_PRUNE_BACKOFF_S,
            max_messages_per_topic_per_second=_GOSSIP_RATE_PER_S,
            adaptive_gossip_enabled=False,
        )
        self.router.scorer = None  # see the module docstring: with default (all-zero) scores it only did harm
        self.pubsub = _CoopPubsub(host, self.router, frozenset(topics), self._deliver)

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Run the services, register the validators, subscribe to every topic; close the inboxes on exit."""
        try:
            async with background_trio_service(self.pubsub), background_trio_service(self.router):
                await self.pubsub.wait_until_ready()
                for topic in self._validators:
                    self.pubsub.set_topic_validator(topic, self._libp2p_validator(topic), False)
                    await self.pubsub.subscribe(topic)
                yield
        finally:
            for inbox in self.inboxes.values():
                inbox.close()

    def validate(self, topic: str, source: str, data: bytes) -> bool:
        """Run the caller's validator; a validator that raises rejects (it must never reach libp2p's router)."""
        try:
            accepted = bool(self._validators[topic](source, data))
        except Exception:  # the boundary around caller code run inside libp2p's tasks: any error is a reject
            logger.exception("gossip validator for %r raised on a message from %s; rejecting it", topic, source)
            accepted = False
        if not accepted:
            self._counters.gossip_rejected += 1
        return accepted

    def _libp2p_validator(self, topic: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        def validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if forwarder == self._my_id:
                return True  # our own publish: NetHost.publish has validated it already
            return self.validate(topic, ID(msg.from_id).to_base58(), msg.data)

        return validator

    def _deliver(self, msg: rpc_pb2.Message) -> None:
        if msg.from_id == self._my_id.to_bytes():
            return  # our own publish
        source = ID(msg.from_id).to_base58()
        for topic in msg.topicIDs:
            inbox = self.inboxes.get(topic)
            if inbox is not None:
                self._counters.gossip_received += 1
                inbox.put((source, msg.data))
