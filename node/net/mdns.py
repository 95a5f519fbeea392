"""LAN discovery with py-libp2p's own mDNS module (``libp2p.discovery.mdns``, zeroconf underneath).

Theory of operation: :func:`open_mdns` builds libp2p's ``MDNSDiscovery`` for a running host, announces the host's
listen addresses under the service type ``_p2p-coop._udp.local.`` (libp2p's "private network" naming, so Coop
nodes find Coop nodes and never an IPFS node on the same LAN: our DHT speaks ``/ipfs/kad/1.0.0``, trap 14), and
yields a receive channel of :class:`LanPeer` candidates. It dials nothing: the daemon decides whom to dial.

How the library is used, and where we deviate:
    * ``MDNSDiscovery.start()`` is not called: it spawns a trio *system* task for its clean-up loop (an exception
      there would crash the whole run) that we do not need. We register the announcement ourselves, in a worker
      thread (zeroconf blocks while it probes), and :meth:`MDNSDiscovery.stop` (unannounce, stop browsing, close
      zeroconf and join its threads) also runs in a worker thread, shielded, on the way out.
    * The library's listener writes what it hears straight into the host's peerstore (and *clears* a peer's
      addresses when an announcement is withdrawn). An mDNS announcement is unauthenticated input: anyone on the
      LAN can claim any peer id and any address. So the listener gets a stand-in peerstore, :class:`_Intake`,
      which never touches the real one: it validates each announcement (an Ed25519 peer id that is not ours, at
      most :data:`MAX_LAN_ADDRS` ``/ip4|ip6/<private or link-local>/tcp/<port>`` addresses, nothing else) and hands
      it over to trio through a bounded channel (full: the announcement is dropped and counted). Withdrawals are
      ignored. The dial that follows is what authenticates the peer: Noise proves the peer id, so a forged
      announcement costs one failed dial and cannot put a wrong address under a real peer's id.
    * Only private and link-local addresses are accepted, so an announcement cannot make us connect to an
      arbitrary host on the internet.
    * The listener's own table of announcement names grows with every name it hears and is pruned only by the
      clean-up loop we do not run: it is replaced by a dict bounded to :data:`MAX_TRACKED_NAMES` entries.
    * The listener's callbacks run in zeroconf's browser thread; the hand-over uses ``TrioToken.run_sync_soon``
      (thread-safe, never blocks the browser thread).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Final, final

import trio
from libp2p.abc import IHost
from libp2p.discovery.mdns.mdns import MDNSDiscovery, create_mdns_discovery
from libp2p.peer.id import ID

from protocol.errors import InvalidKey
from protocol.identity import public_key_from_peer_id

logger = logging.getLogger("node.net")

MDNS_NETWORK: Final = "coop"  # service type _p2p-coop._udp.local.
MAX_LAN_ADDRS: Final = 8  # addresses taken from one announcement
MAX_TRACKED_NAMES: Final = 256  # announcement names the listener remembers
LAN_QUEUE_LEN: Final = 64  # announcements waiting for the daemon; beyond it new ones are dropped
_STOP_TIMEOUT_S: Final = 10.0


@final
@dataclass(frozen=True, slots=True)
class LanPeer:
    """A peer announced on the LAN: its claimed peer id and its dialable ``/p2p/`` addresses (unverified)."""

    peer_id: str
    addrs: tuple[str, ...]


@dataclass(slots=True)
class MdnsStatistics:
    announcements: int = 0  # announcements heard (ours excluded)
    refused: int = 0  # announcements with a bad peer id or no usable address
    dropped: int = 0  # good announcements dropped because the daemon's queue was full


def is_lan_ip(text: str) -> bool:
    """Whether ``text`` is an IP address an mDNS peer may be dialled at: private or link-local, not multicast."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return (ip.is_private or ip.is_link_local) and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def lan_addrs(peer_id: str, addrs: Sequence[object]) -> tuple[str, ...]:
    """The announced addresses we would dial, as ``/ip4|ip6/<LAN ip>/tcp/<port>/p2p/<peer_id>``, at most
    :data:`MAX_LAN_ADDRS`, duplicates removed; everything else (DNS names, relays, other transports, public IPs)
    is dropped."""
    out: list[str] = []
    for addr in addrs:
        parts = str(addr).split("/")
        # ['', 'ip4', '10.0.0.1', 'tcp', '4001'] exactly: no /p2p/ suffix of another id, no extra protocols.
        if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            continue
        if not is_lan_ip(parts[2]) or not parts[4].isdigit() or not 0 < int(parts[4]) < 65536:
            continue
        full = f"/{parts[1]}/{parts[2]}/tcp/{int(parts[4])}/p2p/{peer_id}"
        if full not in out:
            out.append(full)
        if len(out) >= MAX_LAN_ADDRS:
            break
    return tuple(out)


def lan_peer(own_peer_id: str, peer_id: str, addrs: Sequence[object]) -> LanPeer | None:
    """A validated :class:`LanPeer` from one announcement, or None: not an Ed25519 peer id, ours, or no address."""
    try:
        public_key_from_peer_id(peer_id)
    except InvalidKey:
        return None
    if peer_id == own_peer_id:
        return None
    usable = lan_addrs(peer_id, addrs)
    return LanPeer(peer_id, usable) if usable else None


class _BoundedNames(dict[str, Any]):
    """The listener's name -> (peer, time) table, forgetting the oldest name beyond MAX_TRACKED_NAMES."""

    def __setitem__(self, key: str, value: Any) -> None:
        self.pop(key, None)
        super().__setitem__(key, value)
        while len(self) > MAX_TRACKED_NAMES:
            del self[next(iter(self))]


@final
class _Intake:
    """Stands in for the peerstore the library's listener writes to (called from zeroconf's thread)."""

    def __init__(self, own_peer_id: str, send: trio.MemorySendChannel[LanPeer], stats: MdnsStatistics) -> None:
        self._own = own_peer_id
        self._send = send
        self._stats = stats
        self._token = trio.lowlevel.current_trio_token()

    def add_addrs(self, peer_id: ID, addrs: Sequence[object], ttl: int) -> None:
        candidate = lan_peer(self._own, str(peer_id), addrs)
        with contextlib.suppress(trio.RunFinishedError):  # the node is shutting down
            self._token.run_sync_soon(self._deliver, str(peer_id), candidate)

    def clear_addrs(self, peer_id: ID) -> None:
        """A withdrawal (goodbye) is as unauthenticated as an announcement: ignored. Dead peers drop off the DHT."""

    def _deliver(self, peer_id: str, candidate: LanPeer | None) -> None:  # in the trio thread
        if peer_id == self._own:
            return
        self._stats.announcements += 1
        if candidate is None:
            self._stats.refused += 1
            return
        try:
            self._send.send_nowait(candidate)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._stats.dropped += 1


@final
class _Swarm:
    """What ``MDNSDiscovery`` reads from the network service: our peer id and the peerstore (our intake)."""

    def __init__(self, peer_id: ID, intake: _Intake) -> None:
        self._peer_id = peer_id
        self.peerstore = intake

    def get_peer_id(self) -> ID:
        return self._peer_id


@final
class LanDiscovery:
    """A running mDNS announcer and listener. Valid only inside :func:`open_mdns`."""

    def __init__(self, receive: trio.MemoryReceiveChannel[LanPeer], stats: MdnsStatistics) -> None:
        self.peers = receive
        self._stats = stats

    def statistics(self) -> MdnsStatistics:
        return replace(self._stats)


def _build(host: IHost, intake: _Intake) -> MDNSDiscovery:
    discovery = create_mdns_discovery(
        _Swarm(host.get_id(), intake),  # type: ignore[arg-type]
        host=host,
        private_network_fingerprint=MDNS_NETWORK,
    )
    discovery.listener.discovered_services = _BoundedNames()
    discovery.broadcaster.register()  # announces host.get_transport_addrs(); logs (does not raise) on failure
    return discovery


@asynccontextmanager
async def open_mdns(host: IHost) -> AsyncIterator[LanDiscovery]:
    """Announce ``host`` (already listening) on the LAN and listen for other Coop nodes until the block ends.

    Raises:
        OSError: zeroconf could not open its multicast sockets (no usable interface).
    """
    send, receive = trio.open_memory_channel[LanPeer](LAN_QUEUE_LEN)
    stats = MdnsStatistics()
    intake = _Intake(host.get_id().to_base58(), send, stats)
    discovery = await trio.to_thread.run_sync(_build, host, intake)
    try:
        async with send, receive:
            yield LanDiscovery(receive, stats)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_STOP_TIMEOUT_S) as late:
            await trio.to_thread.run_sync(discovery.stop)
        if late.cancelled_caught:
            logger.warning("mDNS did not stop within %.0f s", _STOP_TIMEOUT_S)


def all_loopback(listen: Sequence[str]) -> bool:
    """Whether every listen multiaddr is on a loopback address (mDNS would announce nothing a LAN peer can dial)."""
    for text in listen:
        parts = text.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            return False
        try:
            if not ipaddress.ip_address(parts[2]).is_loopback:
                return False
        except ValueError:
            return False
    return bool(listen)
