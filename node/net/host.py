"""The libp2p host, streams and DHT of the adapter; the rules and workarounds are in ``node/net/__init__.py``."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict
from typing import final

import multiaddr
import multiaddr.exceptions
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol
from libp2p.exceptions import BaseLibp2pError, MultiError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.rcmgr.manager import ResourceManager
from libp2p.rcmgr.metrics import MetricType
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from node.net.common import (
    _CLOSE_TIMEOUT_S,
    _STREAM_ERRORS,
    COOP_DHT_NAMESPACE,
    DHT_INBOUND_HANDLERS,
    MAX_DHT_KEY_BYTES,
    MAX_GOSSIP_BYTES,
    MIN_DHT_KEY_BYTES,
    PROVIDER_ADDR_TTL_S,
    DialError,
    InvalidAddress,
    ListenError,
    NetError,
    NetStatistics,
    Select,
    StreamOpenError,
    TopicValidator,
    Validate,
    _Counters,
)
from node.net.gossip import (
    _Gossip,
)
from node.net.limits import NetLimits, StreamLimiter, new_resource_manager
from node.net.lookup import (
    LookupTrace,
    activate,
    deactivate,
    instrument,
    providers_at_closest,
    providers_nearby,
)
from node.net.mdns import LanDiscovery, all_loopback, open_mdns
from node.net.relay import Relay, is_circuit, open_relay
from node.net.stream import NetStream
from protocol.errors import InvalidKey, ProtocolError, RemoteProtocolError
from protocol.identity import Identity, public_key_from_peer_id

logger = logging.getLogger("node.net")

StreamHandler = Callable[["NetStream"], Awaitable[None]]


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
class NetHost:
    """A running libp2p host with its DHT. Built by :func:`open_host`; valid only inside it."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        validator: _CoopValidator,
        gossip: _Gossip | None,
        counters: _Counters,
        *,
        limits: NetLimits | None = None,
        resources: ResourceManager | None = None,
    ) -> None:
        self._host = host
        self._resources = resources  # libp2p's resource manager, for its refusal count
        self._stream_limiter = StreamLimiter(limits or NetLimits())
        self._dht = dht
        self._validator = validator
        self._gossip = gossip
        self._counters = counters
        self.peer_id: str = host.get_id().to_base58()
        self.lan: LanDiscovery | None = None  # mDNS discovery, when running (open_host's ``mdns``)
        self.mdns_state = "off"  # "on", "off", or "off: <why>"
        self.relay: Relay | None = None  # circuit relay v2 roles (open_host's ``relay_service`` adds HOP)
        self._circuits: dict[str, tuple[str, ...]] = {}  # peer id -> its relayed addresses (from its signed ad)

    # Connections

    def addrs(self) -> list[str]:
        """Our listen addresses as full multiaddrs ending in ``/p2p/<peer id>``, then our relayed addresses."""
        relayed = list(self.relay.reserved.values()) if self.relay is not None else []
        return [str(addr) for addr in self._host.get_addrs()] + relayed

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
        if is_circuit(address):
            return await self._connect_circuit(address)
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

    async def _connect_circuit(self, address: str) -> str:
        peer_id = address.rsplit("/p2p/", 1)[-1]
        pid = _parse_peer_id(peer_id)
        if peer_id == self.peer_id or self.relay is None:
            raise DialError(f"cannot dial {address} through a relay")
        if pid in self._host.get_connected_peers():
            return peer_id
        try:
            await self.relay.dial(address)
        except (ConnectionError, BaseLibp2pError, OSError, ValueError, *_STREAM_ERRORS) as exc:
            self._counters.dials_failed += 1
            raise DialError(f"could not connect to {address} through the relay: {_root_reason(exc)}") from exc
        return peer_id

    def learn_circuits(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember ``peer_id``'s relayed addresses (from its verified ad): :meth:`open_stream` falls back to them."""
        circuits = tuple(a for a in addrs if is_circuit(a) and a.endswith(f"/p2p/{peer_id}"))[:4]
        if circuits and (peer_id in self._circuits or len(self._circuits) < 1024):
            self._circuits[peer_id] = circuits

    async def reserve_relay(self, address: str) -> str:
        """Connect to the relay at ``address`` and reserve a slot; return our relayed address through it.

        Raises:
            InvalidAddress, DialError: as :meth:`connect`; DialError also when the relay refuses a reservation.
        """
        relay_peer = await self.connect(address)
        if self.relay is None:
            raise DialError("this host runs no relay client")
        try:
            return await self.relay.reserve(relay_peer, address)
        except (ConnectionError, BaseLibp2pError, *_STREAM_ERRORS) as exc:
            raise DialError(f"no reservation at {address}: {_root_reason(exc)}") from exc

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
            peer = raw.muxed_conn.peer_id
            if not self._stream_limiter.admit(peer):
                self._counters.streams_limited += 1
                logger.debug("reset a %s stream from %s: over its per-peer stream limits", protocol_id, peer)
                await NetStream(raw, protocol_id, self._counters)._reset_shielded()
                return
            try:
                await serve(raw)
            finally:
                self._stream_limiter.release(peer)

        async def serve(raw: INetStream) -> None:
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
        relayed = False
        while True:
            try:
                raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
                break
            except SwarmException as exc:  # not reachable directly: through a relay, once, if it has an address
                if relayed or not await self._reach_through_relay(peer_id):
                    raise DialError(f"could not open a stream to {peer_id}: {_root_reason(exc)}") from exc
                relayed = True
            except BaseLibp2pError as exc:
                raise StreamOpenError(f"{peer_id} did not accept {protocol_id}: {_root_reason(exc)}") from exc
        self._counters.streams_opened += 1
        return NetStream(raw, protocol_id, self._counters)

    async def _reach_through_relay(self, peer_id: str) -> bool:
        """After a failed direct dial: connect through one of the peer's relayed addresses, if any works."""
        for address in self._circuits.get(peer_id, ()):
            try:
                await self._connect_circuit(address)
            except NetError as exc:
                logger.debug("relayed dial of %s failed: %s", peer_id, exc)
                continue
            return True
        return False

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

    async def find_providers(
        self, key: str, count: int, *, trace: LookupTrace | None = None, nearby: bool = False
    ) -> list[str]:
        """Peer ids that announced ``key``, deduplicated, at most ``count``. Hints only: confirm over a stream.

        Their advertised addresses are added to the peerstore so :meth:`open_stream` can dial them. Given a
        ``trace``, the lookup's queries, rounds, hops and times are recorded in it (``node/net/lookup.py``).
        ``nearby``: the key is not full (a shard key), so asking the few closest peers our routing table knows is
        enough, with no walk, unless their answers show that our table lacks the key's neighbourhood
        (:func:`~node.net.lookup.providers_nearby`).

        Raises:
            ValueError: a malformed key.
        """
        raw_key = _check_dht_key(key)
        token = activate(trace)
        try:
            infos = await providers_nearby(self._dht, raw_key, trace) if nearby else None
            if infos is None:
                infos = await providers_at_closest(self._dht, raw_key, trace)
        finally:
            deactivate(token)
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
            connections_refused=int(self._resources.metrics.get_counter(MetricType.CONNECTION_BLOCKS))
            if self._resources is not None and self._resources.metrics is not None
            else 0,
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
    mdns: bool = False,
    limits: NetLimits | None = None,
    relay_service: bool = False,
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
        mdns: announce this host on the LAN and listen for other Coop nodes (``node/net/mdns.py``); the
            candidates arrive on ``NetHost.lan.peers`` and are not dialled here. Skipped when every listen address
            is loopback (``NetHost.mdns_state`` says so) or when zeroconf cannot open its sockets.
        limits: connection and stream limits (:class:`NetLimits`; its defaults if None).
        relay_service: also relay circuits for others (circuit relay v2 HOP, ``node/net/relay.py``). Every host
            can be reached through a relay and dial through one.

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
    limits = limits or NetLimits()
    resources = new_resource_manager(limits)  # node/net/limits.py
    host = new_host(
        key_pair=key_pair,
        # Explicitly Noise only: the default also offers plaintext, secio and TLS (trap 1).
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)},
        muxer_opt=muxers,
        # One connection per peer, else every dial waits out the 250 ms happy-eyeballs delay (trap 2).
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=listen_addrs,
        resource_manager=resources,
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
            dht._inbound_limiter = trio.CapacityLimiter(DHT_INBOUND_HANDLERS)  # 12 in 0.8.1: see node/net
            dht.register_validator(COOP_DHT_NAMESPACE, validator)
            instrument(dht.peer_routing)  # counts a lookup's queries and hops for a LookupTrace
            async with background_trio_service(dht), AsyncExitStack() as stack:
                if gossip is not None:
                    await stack.enter_async_context(gossip.run())
                net_host = NetHost(host, dht, validator, gossip, counters, limits=limits, resources=resources)
                net_host.relay = await stack.enter_async_context(open_relay(host, hop=relay_service))
                if mdns and all_loopback(list(listen)):
                    net_host.mdns_state = "off: listening on loopback only"
                elif mdns:
                    try:
                        net_host.lan = await stack.enter_async_context(open_mdns(host))
                        net_host.mdns_state = "on"
                    except OSError as exc:
                        net_host.mdns_state = f"off: {exc}"
                        logger.warning("mDNS LAN discovery is off: %s", exc)
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
