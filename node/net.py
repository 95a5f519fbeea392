"""The libp2p adapter: the one module of the daemon that imports py-libp2p (0.8.1).

Theory of operation: :func:`open_host` builds a host from a raw Ed25519 seed, listens, runs a server-mode Kademlia
DHT beside it (and, given ``gossip_topics``, GossipSub) and yields a :class:`NetHost`, through which the rest of
``node/`` dials, opens and serves streams (:class:`NetStream`, with length-prefixed frames), uses the DHT and
publishes/receives gossip. Peer ids cross this boundary as base58 strings and addresses as multiaddr strings; no
libp2p type leaks out.

Rules:
    * Security is Noise only. The default host also accepts plaintext (a peer knowing only a victim's public key
      could pose as the victim: libp2p-facts trap 1), secio and TLS.
    * libp2p errors caused by a peer or the network are caught here, narrowly, and re-raised as the typed errors
      below. A stream handler may raise :class:`NetError` or :class:`~protocol.errors.RemoteProtocolError` to drop a
      misbehaving peer's stream; anything else is a bug and propagates (taking the connection down).
    * DHT records live under ``/coop/``, checked by the caller's ``validate``/``select``; a validator rejects by
      raising :class:`~protocol.errors.ProtocolError` or ``ValueError``. ``strict_validation`` refuses every other
      namespace except libp2p's built-in ``pk``/``ipns``.
    * DHT keys are 2-50 bytes of UTF-8: FIND_NODE ignores longer non-multihash targets, silently confining records
      to direct neighbours (trap 3). Callers hash long names.

Deviations and workarounds:
    * ``KadDHT.get_value`` returns a local copy first, unvalidated (trap 5): :meth:`NetHost.dht_get` re-validates.
      Nothing checks freshness: records must carry their own expiry.
    * ``KadDHT.provide``/``find_providers`` guess whether a key is a CID, hex or text; we always use its UTF-8
      bytes. ``find_providers`` repeats providers (trap 7): we dedupe, and add their addresses to the peerstore
      (libp2p does not) so :meth:`NetHost.open_stream` can reach them. ``find_providers`` also returns only the
      local records whenever there are any, so a provider never saw the others: we merge local records with a
      GET_PROVIDERS query to each of the peers closest to the key (a private helper of ``ProviderStore``).
    * The Kademlia protocol id is fixed at ``/ipfs/kad/1.0.0`` (trap 14): never bootstrap from public IPFS peers.
    * GossipSub's defaults drop or delay messages (trap 10). What we set, for a 10-100 node network:
        - ``heartbeat_interval`` 1 s (default 120 s: mesh repair and IHAVE gossip every two minutes).
        - ``degree``/``degree_low``/``degree_high`` 6/5/12: go-libp2p's defaults (0.8.1 has none).
        - ``max_messages_per_topic_per_second`` 200 (default 10: past it the router silently stops *forwarding*,
          per topic per forwarder, our own publishes included).
        - ``prune_back_off`` 10 s (default 60 s, during which a leaf pruned by a full hub starved).
        - ``adaptive_gossip_enabled`` off: every 30 s it rescales the heartbeat assuming a 120 s base, to 30-60 s
          whenever its health score is under 0.7.
        - No peer scorer (``router.scorer = None``; no constructor option). Default scores are all 0, so it gated
          nothing, but it drove 0.8.1's opportunistic grafting, which re-grafted the peers pruned a heartbeat
          before; they took that for a GRAFT flood and pruned back, and their hub then stopped gossiping to them
          (15-node star, a leaf publishing 20: several leaves got none or half; without it every leaf got all 20
          in 5 runs of 6).
        - Only ``/meshsub/1.1.0``: from 1.2, 0.8.1 sends an IDONTWANT to each mesh peer for *every* message
          (go-libp2p: over 1 KiB only), doubling the RPCs in each outbound queue.
        - Per-peer outbound queues of :data:`GOSSIP_PEER_QUEUE_LEN` RPCs (fixed at 32, dropping the newest: 16 of a
          30-message burst arrived): ``_CoopPubsub`` resizes each one as libp2p stores it.
        - Flood publish (go-libp2p's default; absent in 0.8.1): ``_CoopGossipSub`` sends our own messages to every
          peer in the topic, not just the mesh, which is empty on a node its peers have just pruned.
        - Delivery bypasses libp2p's 32-entry subscription channel (which silently drops the newest) for our own
          bounded inbox per topic, which drops the oldest and counts it. Remote subscriptions are limited to our
          topics (``allowed_topics``).
      Left as they are: gossip window/history (3/5 heartbeats), IHAVE/IWANT limits (10/s per peer; a 1 s heartbeat
      sends about one), eclipse protection (inert without a scorer), peer exchange (off: it would dial whoever a
      PRUNE names), the 1 MiB inbound RPC cap (we publish at most :data:`MAX_GOSSIP_BYTES`). A peer that shrinks
      below ``degree_low`` re-grafts peers it pruned within their back-off (0.8.1 records none for its own
      prunes); they prune back and are not gossiped to for 10 s. Gossip stays best effort: anything that must
      arrive also needs a pull path over a stream.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Final, final

import multiaddr
import multiaddr.exceptions
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol
from libp2p.exceptions import BaseLibp2pError, MultiError
from libp2p.io.exceptions import IOException
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import PriorityQueue, RpcQueue
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from protocol.errors import InvalidKey, OversizedFrame, ProtocolError, RemoteProtocolError
from protocol.identity import Identity, public_key_from_peer_id

logger = logging.getLogger(__name__)

COOP_DHT_NAMESPACE: Final = "coop"
MAX_DHT_KEY_BYTES: Final = 50  # FIND_NODE ignores longer targets that are not multihashes (trap 3)
MIN_DHT_KEY_BYTES: Final = 2  # ... and shorter ones
FRAME_HEADER: Final = struct.Struct(">I")  # 4-byte big-endian body length
MAX_FRAME_BYTES: Final = (1 << 32) - 1  # what the header can express
DEFAULT_READ_BYTES: Final = 64 * 1024  # 64 KiB
PROVIDER_QUERY_TIMEOUT_S: Final = 5.0
PROVIDER_ADDR_TTL_S: Final = 600  # how long a provider's advertised addresses stay dialable
_RESET_TIMEOUT_S: Final = 1.0  # bound on the shielded reset after a failed or cancelled handler
_CLOSE_TIMEOUT_S: Final = 2.0  # bound on closing every connection at shutdown
MAX_GOSSIP_BYTES: Final = 64 * 1024  # 64 KiB per published message (libp2p silently drops RPCs over 1 MiB)
GOSSIP_INBOX_LEN: Final = 256  # messages buffered per topic for a slow consumer; beyond it the oldest are dropped
GOSSIP_PEER_QUEUE_LEN: Final = 128  # outbound RPCs queued per peer (libp2p: 32); bounds memory to ~8 MiB per peer
_GOSSIP_HEARTBEAT_S: Final = 1
_GOSSIP_DEGREE: Final = 6  # D: mesh peers per topic
_GOSSIP_DEGREE_LOW: Final = 5
_GOSSIP_DEGREE_HIGH: Final = 12
_GOSSIP_RATE_PER_S: Final = 200.0  # messages per second per topic per forwarder before the router stops forwarding
_GOSSIP_PRUNE_BACKOFF_S: Final = 10

# Errors py-libp2p raises on stream I/O when the peer or the connection goes away or misbehaves.
_STREAM_ERRORS: Final = (IOException, MuxedStreamError, MuxedConnError)

Validate = Callable[[str, bytes], None]
Select = Callable[[str, list[bytes]], int]
StreamHandler = Callable[["NetStream"], Awaitable[None]]
TopicValidator = Callable[[str, bytes], bool]  # (source peer id, data) -> accept?


class NetError(Exception):
    """Base of the errors this module raises."""


class DialError(NetError):
    """A peer could not be reached: no route, refused, failed handshake or wrong identity. Not our bug."""


class InvalidAddress(NetError, ValueError):
    """A multiaddr or peer id string could not be parsed (bad input, from a caller or a peer)."""


class ListenError(NetError):
    """The host could not listen on a requested address (in use, not ours, unsupported)."""


class StreamOpenError(NetError):
    """We reached the peer but it did not accept a stream for the protocol (or the connection broke)."""


class StreamClosed(NetError, trio.BrokenResourceError):
    """The stream ended under us: the peer closed or reset it, or the connection dropped."""


class FrameTooLarge(NetError, OversizedFrame):
    """A peer announced a frame over the receiver's cap. The peer's fault; the stream has been reset."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class NetStatistics:
    """A snapshot of a :class:`NetHost`'s counters."""

    connected_peers: int
    routing_table_size: int
    dials_failed: int
    streams_opened: int
    streams_accepted: int
    streams_dropped: int  # inbound streams whose handler raised NetError/RemoteProtocolError
    frames_too_large: int
    dht_records_rejected: int  # records dht_get refused on re-validation
    refused: dict[str, int]  # inbound streams dropped, by error code (oversized, malformed, bad-signature...)
    gossip_received: int  # messages from others that passed validation
    gossip_rejected: int  # messages our validator refused (or raised on), ours included
    gossip_dropped: int  # accepted messages dropped, oldest first, because a topic's consumer fell behind
    gossip_published: int


@dataclass(slots=True)
class _Counters:
    dials_failed: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_dropped: int = 0
    frames_too_large: int = 0
    dht_records_rejected: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    gossip_received: int = 0
    gossip_rejected: int = 0
    gossip_dropped: int = 0
    gossip_published: int = 0


@final
class _DhtNoiseFilter(logging.Filter):
    """Drops two WARNINGs KadDHT logs on normal operation: a peer closing its DHT stream cleanly (logged as a
    read failure with an empty reason) and a lookup miss (``dht_get`` returns ``None`` for that)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Failed to read DHT message from stream: %s":
            return bool(record.args) and str(record.args[0]) != ""  # type: ignore[index]
        return not (isinstance(record.msg, str) and record.msg.startswith("Value not found for key"))


def configure_libp2p_logging() -> None:
    """Route the ``libp2p`` logger's warnings through normal :mod:`logging`.

    Importing libp2p leaves that logger without a handler and non-propagating, so its warnings reach stderr via
    Python's last-resort handler. Unless ``LIBP2P_DEBUG`` is set (libp2p's own debug logging is then in charge),
    make it propagate at WARNING. libp2p also pins its auto-connector logger to INFO (a line every 10 s); reset it
    to inherit. Idempotent.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    root = logging.getLogger("libp2p")
    root.setLevel(logging.WARNING)
    root.propagate = True
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)
    dht_logger = logging.getLogger("libp2p.kad_dht.kad_dht")
    if not any(isinstance(f, _DhtNoiseFilter) for f in dht_logger.filters):
        dht_logger.addFilter(_DhtNoiseFilter())


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _root_reason(exc: BaseException) -> str:
    """The innermost message under a libp2p error (swarm errors wrap a MultiError of per-address failures)."""
    for _ in range(8):  # chains are short; bound the walk anyway
        inner = exc.args[0] if isinstance(exc, MultiError) and exc.args and isinstance(exc.args[0], list) else None
        nxt = inner[0] if inner else exc.__cause__
        if not isinstance(nxt, BaseException) or not str(nxt):
            break
        exc = nxt
    return str(exc)


def _parse_peer_id(peer_id: str) -> ID:
    try:
        public_key_from_peer_id(peer_id)  # Coop peers are Ed25519; this rejects anything else
    except InvalidKey as exc:
        raise InvalidAddress(str(exc)) from exc
    return ID.from_base58(peer_id)


def _check_dht_key(key: str) -> bytes:
    raw = key.encode("utf-8")
    if not MIN_DHT_KEY_BYTES <= len(raw) <= MAX_DHT_KEY_BYTES:
        raise ValueError(f"DHT key must be {MIN_DHT_KEY_BYTES}-{MAX_DHT_KEY_BYTES} bytes (hash long names): {key!r}")
    return raw


def _check_record_key(key: str) -> None:
    _check_dht_key(key)
    if not key.startswith(f"/{COOP_DHT_NAMESPACE}/"):
        raise ValueError(f"DHT record keys live under /{COOP_DHT_NAMESPACE}/: {key!r}")


def _reject_all(key: str, value: bytes) -> None:
    raise ValueError("no DHT validator configured: /coop/ records are refused")


def _select_first(key: str, values: list[bytes]) -> int:
    return 0


@final
class _CoopValidator(Validator):
    """Adapts the caller's callables to libp2p's Validator interface for the ``/coop/`` namespace."""

    def __init__(self, validate: Validate, select: Select) -> None:
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        if len(key.encode("utf-8")) > MAX_DHT_KEY_BYTES:
            raise ValueError("DHT key too long")
        self._validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        index = self._select(key, values)
        if not 0 <= index < len(values):
            raise ValueError(f"select returned {index} for {len(values)} values")
        return index


@final
class NetStream:
    """One libp2p stream, with typed errors. Use as an async context manager, or call :meth:`close`.

    Attributes:
        remote_peer: the authenticated (Noise) peer id of the other end.
        protocol: the negotiated protocol id.
    """

    __slots__ = ("_counters", "_raw", "protocol", "remote_peer")

    def __init__(self, raw: INetStream, protocol: str, counters: _Counters) -> None:
        self._raw = raw
        self._counters = counters
        self.remote_peer: str = raw.muxed_conn.peer_id.to_base58()
        self.protocol = protocol

    async def read_some(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        """Read between 1 and ``max_bytes`` bytes; ``b""`` means the peer closed its side cleanly.

        Raises:
            StreamClosed: the stream was reset or the connection dropped.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        try:
            return await self._raw.read(max_bytes)
        except EOFError:  # libp2p's StreamEOF and MuxedStreamEOF are both EOFError
            return b""
        except _STREAM_ERRORS as exc:
            raise StreamClosed(f"stream from {self.remote_peer} broke: {exc!r}") from exc

    async def read_exactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (libp2p reads can be short).

        Raises:
            StreamClosed: the stream ended, was reset, or the connection dropped before ``n`` bytes arrived.
        """
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read_some(n - len(buf))
            if not chunk:
                raise StreamClosed(f"stream from {self.remote_peer} ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def write(self, data: bytes) -> None:
        """Write all of ``data``.

        Raises:
            StreamClosed: the stream is closed for writing, was reset, or the connection dropped.
        """
        try:
            await self._raw.write(data)
        except _STREAM_ERRORS as exc:
            raise StreamClosed(f"stream to {self.remote_peer} broke: {exc!r}") from exc

    async def close(self) -> None:
        """Close our side (the peer reads EOF) and release the stream. Idempotent; never raises on a dead stream."""
        try:
            await self._raw.close()
        except _STREAM_ERRORS as exc:
            logger.debug("closing a stream to %s: %r", self.remote_peer, exc)

    async def reset(self) -> None:
        """Abort the stream in both directions (the peer sees a reset). Idempotent."""
        try:
            await self._raw.reset()
        except _STREAM_ERRORS as exc:
            logger.debug("resetting a stream to %s: %r", self.remote_peer, exc)

    async def _reset_shielded(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_RESET_TIMEOUT_S):
            await self.reset()

    async def __aenter__(self) -> NetStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self._reset_shielded()


async def send_frame(stream: NetStream, data: bytes) -> None:
    """Write ``data`` with a 4-byte big-endian length prefix.

    Raises:
        ValueError: ``data`` is longer than the header can express (our bug).
        StreamClosed: the stream broke.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(data)} bytes exceeds the 4-byte length prefix")
    await stream.write(FRAME_HEADER.pack(len(data)) + data)


async def receive_frame(stream: NetStream, max_bytes: int) -> bytes:
    """Read one length-prefixed frame, refusing (before reading the body) any frame over ``max_bytes``.

    Raises:
        FrameTooLarge: the announced length exceeds ``max_bytes``; the stream has been reset.
        StreamClosed: the stream ended or broke before a whole frame arrived.
    """
    (length,) = FRAME_HEADER.unpack(await stream.read_exactly(FRAME_HEADER.size))
    if length > max_bytes:
        stream._counters.frames_too_large += 1
        await stream._reset_shielded()
        raise FrameTooLarge(f"{stream.remote_peer} announced a {length}-byte frame; the cap is {max_bytes}")
    return await stream.read_exactly(length) if length else b""


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


@final
class NetHost:
    """A running libp2p host with its DHT. Built by :func:`open_host`; valid only inside it."""

    def __init__(
        self, host: IHost, dht: KadDHT, validator: _CoopValidator, gossip: _Gossip | None, counters: _Counters
    ) -> None:
        self._host = host
        self._dht = dht
        self._validator = validator
        self._gossip = gossip
        self._counters = counters
        self.peer_id: str = host.get_id().to_base58()

    # Connections

    def addrs(self) -> list[str]:
        """Our listen addresses as full multiaddrs ending in ``/p2p/<peer id>``."""
        return [str(addr) for addr in self._host.get_addrs()]

    def connected_peers(self) -> list[str]:
        """Peer ids we hold a connection to."""
        return [pid.to_base58() for pid in self._host.get_connected_peers()]

    async def connect(self, address: str) -> str:
        """Dial a ``/p2p/``-terminated multiaddr (a no-op if already connected); return the peer id.

        Lifts the 60 s negative dial cache for that peer first (trap 12), so a restarted peer can be redialed.

        Raises:
            InvalidAddress: ``address`` is not a multiaddr ending in ``/p2p/<Ed25519 peer id>``.
            DialError: the peer could not be reached, or the handshake failed (including a wrong identity).
        """
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except (multiaddr.exceptions.Error, ValueError) as exc:
            raise InvalidAddress(f"not a /p2p/ multiaddr: {address!r} ({exc})") from exc
        peer_id = info.peer_id.to_base58()
        _parse_peer_id(peer_id)
        if peer_id == self.peer_id:
            raise DialError("refusing to dial ourselves")
        network = self._host.get_network()
        if isinstance(network, Swarm):  # unblock_peer is not on the INetworkService interface
            network.unblock_peer(info.peer_id)
        try:
            await self._host.connect(info)
        except SwarmException as exc:
            self._counters.dials_failed += 1
            raise DialError(f"could not connect to {address}: {_root_reason(exc)}") from exc
        return peer_id

    async def close_all_connections(self) -> None:
        """Close every connection (used on shutdown, so peers notice at once).

        Concurrently: each close takes ~0.2 s in libp2p, so one by one a node with more than ten peers overran the
        shutdown's bound and left the rest open.
        """

        async def close(pid: ID) -> None:
            try:
                await self._host.disconnect(pid)
            except (BaseLibp2pError, *_STREAM_ERRORS, OSError, trio.BrokenResourceError) as exc:
                logger.debug("closing the connection to %s failed: %r", pid, exc)

        async with trio.open_nursery() as nursery:
            for pid in list(self._host.get_connected_peers()):
                nursery.start_soon(close, pid)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (no-op if none)."""
        await self._host.disconnect(_parse_peer_id(peer_id))

    # Streams

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve inbound streams for ``protocol_id`` with ``handler``, one task per stream.

        The stream is closed when the handler returns (as trio's ``serve_tcp`` does). If the handler raises
        :class:`NetError` or :class:`~protocol.errors.RemoteProtocolError` (a misbehaving or vanished peer), the
        stream is reset and the error logged at debug level; any other exception is a bug and propagates.
        """

        async def on_stream(raw: INetStream) -> None:
            self._counters.streams_accepted += 1
            stream = NetStream(raw, protocol_id, self._counters)
            try:
                await handler(stream)
            except (NetError, RemoteProtocolError) as exc:
                self._counters.streams_dropped += 1
                code = exc.code if isinstance(exc, RemoteProtocolError) else type(exc).__name__
                self._counters.refused[code] = self._counters.refused.get(code, 0) + 1
                logger.debug("dropped a %s stream from %s: %r", protocol_id, stream.remote_peer, exc)
                await stream._reset_shielded()
                return
            except BaseException:
                await stream._reset_shielded()
                raise
            await stream.close()

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def open_stream(self, peer_id: str, protocol_id: str) -> NetStream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``, dialing known addresses if not connected.

        Raises:
            InvalidAddress: ``peer_id`` is not an Ed25519 peer id.
            DialError: not connected, and the peer could not be reached.
            StreamOpenError: the peer refused the protocol or the connection broke during negotiation.
        """
        pid = _parse_peer_id(peer_id)
        try:
            raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except SwarmException as exc:
            raise DialError(f"could not open a stream to {peer_id}: {_root_reason(exc)}") from exc
        except BaseLibp2pError as exc:
            raise StreamOpenError(f"{peer_id} did not accept {protocol_id}: {_root_reason(exc)}") from exc
        self._counters.streams_opened += 1
        return NetStream(raw, protocol_id, self._counters)

    # DHT

    async def bootstrap(self, addresses: Sequence[str]) -> int:
        """Join the DHT: connect to each peer, add it to the routing table, then refresh the table (trap 4).

        Unreachable or malformed addresses are logged and skipped.

        Returns:
            How many of ``addresses`` we connected to.
        """
        reached = 0
        for address in addresses:
            try:
                peer_id = await self.connect(address)
            except NetError as exc:
                logger.warning("bootstrap peer %s unreachable: %s", address, exc)
                continue
            reached += 1
            await self._dht.add_peer(ID.from_base58(peer_id))
        if reached:
            await self._dht.refresh_routing_table()
        return reached

    def routing_table_peers(self) -> list[str]:
        """Peer ids in our Kademlia routing table."""
        return [pid.to_base58() for pid in self._dht.routing_table.get_peer_ids()]

    def routing_table_size(self) -> int:
        """Number of peers in our Kademlia routing table."""
        return self._dht.get_routing_table_size()

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (``/coop/...``, at most :data:`MAX_DHT_KEY_BYTES` bytes) locally and at
        the closest peers we can reach. Records carry no TTL here: put expiry in the value.

        Raises:
            ValueError: a malformed key, a value the validator rejects (or whatever ``validate`` raises), or a
                local value that ``select`` prefers to this one.
        """
        _check_record_key(key)
        await self._dht.put_value(key, value)

    async def dht_get(self, key: str) -> bytes | None:
        """Return the best value stored under ``key``, or ``None`` if none was found or it fails validation.

        libp2p returns a local copy first, unvalidated and kept for 24 h (trap 5), so the result is re-validated
        here; a local copy that no longer validates (an expired ad) is dropped and the network is asked instead.
        Freshness beyond what the validator checks is the caller's.

        Raises:
            ValueError: a malformed key.
        """
        _check_record_key(key)
        for _ in range(2):
            value = await self._dht.get_value(key)
            if value is None:
                return None
            try:
                self._validator.validate(key, value)
            except (ProtocolError, ValueError) as exc:
                self._counters.dht_records_rejected += 1
                logger.debug("dropping an invalid DHT record under %s: %r", key, exc)
                if not self._dht.value_store.remove(key.encode()):
                    return None  # it came from the network: nothing better to ask for
                continue
            return value
        return None

    async def provide(self, key: str) -> bool:
        """Announce that we provide ``key`` (2-50 bytes of UTF-8; hash long names). Returns libp2p's success flag.

        Raises:
            ValueError: a malformed key.
        """
        return await self._dht.provider_store.provide(_check_dht_key(key))

    async def find_providers(self, key: str, count: int) -> list[str]:
        """Peer ids that announced ``key``, deduplicated, at most ``count``. Hints only: confirm over a stream.

        Their advertised addresses are added to the peerstore so :meth:`open_stream` can dial them.

        Raises:
            ValueError: a malformed key.
        """
        raw_key = _check_dht_key(key)
        infos = await self._lookup_providers(raw_key)
        peerstore = self._host.get_peerstore()
        found: list[str] = []
        for info in infos:
            peer_id = info.peer_id.to_base58()
            if peer_id in found:
                continue
            try:
                public_key_from_peer_id(peer_id)
            except InvalidKey:
                continue  # not a Coop (Ed25519) peer
            if info.addrs and peer_id != self.peer_id:
                peerstore.add_addrs(info.peer_id, info.addrs, PROVIDER_ADDR_TTL_S)
            found.append(peer_id)
            if len(found) >= count:
                break
        return found

    async def _lookup_providers(self, raw_key: bytes) -> list[PeerInfo]:
        """Local provider records plus those held by the peers closest to the key.

        ``ProviderStore.find_providers`` returns the local records alone whenever there are any, so a node that
        provides a key itself (or heard of one provider) never sees the others. Provider records are stored at
        the k peers closest to the key, so we find those peers and ask each, merging with the local records.
        """
        store = self._dht.provider_store
        infos: list[PeerInfo] = list(store.get_providers(raw_key))
        closest = await self._dht.peer_routing.find_closest_peers_network(raw_key)

        async def ask(peer: ID) -> None:
            # The private helper catches (and logs) every error itself and returns ([], []) then.
            with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
                providers, _closer = await store._get_providers_from_peer_with_closers(peer, raw_key)
                infos.extend(providers)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                if peer != self._host.get_id():
                    nursery.start_soon(ask, peer)
        return infos

    # Gossip

    def _gossip_for(self, topic: str) -> _Gossip:
        if self._gossip is None or topic not in self._gossip.inboxes:
            raise ValueError(f"not a gossip topic of this host: {topic!r}")
        return self._gossip

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign ``data`` and gossip it on ``topic``. Best effort: no acknowledgement, and no error if no peer hears.

        Our own validator checks it first; our own messages are not delivered to :meth:`gossip_messages`.

        Raises:
            ValueError: ``topic`` is not one of ``gossip_topics``, ``data`` is over :data:`MAX_GOSSIP_BYTES`, or our
                own validator rejected it (counted in ``gossip_rejected``).
        """
        gossip = self._gossip_for(topic)
        if len(data) > MAX_GOSSIP_BYTES:
            raise ValueError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP_BYTES}")
        if not gossip.validate(topic, self.peer_id, data):
            raise ValueError(f"our own validator rejected a message for {topic!r}")
        await gossip.pubsub.publish(topic, data)
        self._counters.gossip_published += 1

    def gossip_messages(self, topic: str) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        """A receiver of ``(source peer id, data)`` for each message from others on ``topic`` that passed validation.

        Each call returns a new clone of the topic's one channel (consumers compete for messages). It buffers
        :data:`GOSSIP_INBOX_LEN` messages; beyond that the oldest are dropped (``gossip_dropped``). It ends when the
        host closes.

        Raises:
            ValueError: ``topic`` is not one of ``gossip_topics``.
        """
        return self._gossip_for(topic).inboxes[topic].receiver()

    def gossip_peers(self, topic: str) -> list[str]:
        """Peer ids in our GossipSub mesh for ``topic`` (those we forward full messages to).

        Raises:
            ValueError: ``topic`` is not one of ``gossip_topics``.
        """
        return [pid.to_base58() for pid in self._gossip_for(topic).router.mesh.get(topic, ())]

    async def wait_gossip_peer(self, topic: str, peer_id: str) -> None:
        """Wait until ``peer_id`` is in our GossipSub mesh for ``topic``; bound it with a cancel scope.

        Raises:
            ValueError: ``topic`` is not one of ``gossip_topics``.
            InvalidAddress: ``peer_id`` is not an Ed25519 peer id.
        """
        gossip = self._gossip_for(topic)
        await gossip.router.wait_for_mesh(_parse_peer_id(peer_id), topic, timeout=math.inf)

    def statistics(self) -> NetStatistics:
        """A snapshot of this host's counters."""
        return NetStatistics(
            connected_peers=len(self._host.get_connected_peers()),
            routing_table_size=self.routing_table_size(),
            **asdict(self._counters),
        )


@asynccontextmanager
async def open_host(
    *,
    seed: bytes,
    listen: Sequence[str],
    dht_validate: Validate = _reject_all,
    dht_select: Select = _select_first,
    gossip_topics: Mapping[str, TopicValidator] | None = None,
) -> AsyncIterator[NetHost]:
    """Run a libp2p host (TCP, Noise only, Yamux) with a server-mode Kademlia DHT, and GossipSub if asked.

    Args:
        seed: the raw 32-byte Ed25519 private seed (``Identity.seed()``); the host's peer id is the identity's.
        listen: multiaddrs to listen on, e.g. ``"/ip4/127.0.0.1/tcp/0"``.
        dht_validate: ``validate(key, value)`` for ``/coop/`` records; rejects by raising
            :class:`~protocol.errors.ProtocolError` or ``ValueError``. The default refuses every record.
        dht_select: ``select(key, values)`` returns the index of the best of ``values`` (all valid).
        gossip_topics: if given, run GossipSub (tuned as the module docstring says) subscribed to each topic, whose
            ``validator(source, data)`` accepts a message by returning true. ``source`` is the signed author's peer
            id. A validator that returns false or raises rejects the message: it is neither delivered nor
            forwarded. Validators run inside libp2p's router: keep them fast and non-blocking.

    Yields:
        The running host, subscribed to every gossip topic. Leaving the block closes every connection and stops
        the DHT and GossipSub (ending every :meth:`NetHost.gossip_messages` channel).

    Raises:
        protocol.errors.LocalProtocolError: ``seed`` is not 32 bytes.
        InvalidAddress: a listen address does not parse.
        ListenError: a listen address could not be bound.
    """
    configure_libp2p_logging()
    expected_peer_id = Identity.from_seed(seed).peer_id
    try:
        listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    except (multiaddr.exceptions.Error, ValueError) as exc:
        raise InvalidAddress(f"bad listen address in {list(listen)!r}: {exc}") from exc
    key_pair = create_new_key_pair(seed)
    muxers: TMuxerOptions = {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    host = new_host(
        key_pair=key_pair,
        # Explicitly Noise only: the default also offers plaintext, secio and TLS (trap 1).
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)},
        muxer_opt=muxers,
        # One connection per peer, else every dial waits out the 250 ms happy-eyeballs delay (trap 2).
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=listen_addrs,
    )
    if host.get_id().to_base58() != expected_peer_id:  # pragma: no cover - guards a libp2p key-format change
        raise RuntimeError("libp2p derived a different peer id from the seed")
    validator = _CoopValidator(dht_validate, dht_select)
    counters = _Counters()
    # Built before the host listens, so Pubsub's connection notifee sees every peer.
    gossip = None if gossip_topics is None else _Gossip(host, gossip_topics, counters)
    # host.run and the DHT service each open nurseries, so an exception from the caller's block comes out wrapped
    # three groups deep (trap 13). A lone exception is re-raised bare, outside the except block so that its own
    # __cause__/__context__ survive; several stay grouped.
    lone: BaseException | None = None
    try:
        async with host.run(listen_addrs):
            # Swarm.listen reports failures only in its return value, which host.run drops.
            missing = [str(a) for a in listen_addrs if str(a) not in host.get_network().listeners]
            if missing:
                raise ListenError(f"could not listen on {missing} (see the libp2p log for why)")
            dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
            dht.register_validator(COOP_DHT_NAMESPACE, validator)
            async with background_trio_service(dht), AsyncExitStack() as stack:
                if gossip is not None:
                    await stack.enter_async_context(gossip.run())
                net_host = NetHost(host, dht, validator, gossip, counters)
                try:
                    yield net_host
                finally:
                    # host.run() leaves established connections open when it stops (their sockets are only
                    # reclaimed by the GC: trap 15), so peers keep a live-looking connection to a node that is
                    # gone and every DHT query to it waits out a 10 s timeout. Close them explicitly.
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                        await net_host.close_all_connections()
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        lone = leaves[0]
    if lone is not None:
        raise lone
