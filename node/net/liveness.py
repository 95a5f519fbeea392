"""Peer liveness and reconnection: drop connections that went silent, and redial lost peers until they answer.

Theory of operation. libp2p notices a connection that closes, but not one that goes silent: when a cable is pulled
or the network partitions, TCP keeps the connection "established" for many minutes while every DHT query to
the peer waits out py-libp2p's 10 s timeout. Measured in tests/test_partition.py: with half of six nodes cut off,
`find` on either half returned nothing for over a minute, because each walk kept asking the unreachable half.
And libp2p never redials by itself, so after the network heals only bootstrap keepers reconnect, and only to
their bootstrap peers: a half whose nodes bootstrapped among themselves would stay apart for good.

:func:`keep_peers` runs two loops:

* every ``interval_s`` it pings up to ``pings_per_round`` connected peers (``/ipfs/ping/1.0.0``, which every libp2p
  host serves): those with a missed ping first, then those pinged longest ago, so each peer is checked every
  ceil(peers / pings_per_round) rounds. Each ping is a new stream (a multistream-select round trip on both sides):
  pinging every peer every round made an idle node's cost grow with the network (29 peers: 12 streams a second
  in and out, most of an idle node's CPU), and 30 idle nodes saturated two cores. A peer
  that leaves ``MISSES_TO_DROP`` pings in a row unanswered within ``timeout_s`` is disconnected, removed from the
  Kademlia routing table, put in the swarm's negative dial cache (other peers' stale FIND_NODE answers put it back
  in the table, and each walk then waited 10 s dialing it; blocked, the dial fails at once) and remembered as
  *lost*, with its addresses. A peer whose connection libp2p closed (it shut down, or the connection broke) is
  remembered the same way.
* it redials each lost peer, each attempt bounded by ``timeout_s``, backing off from ``interval_s`` doubling to
  ``redial_max_s``; on success the peer goes back into the routing table and the table is refreshed, which is how
  the two halves of a healed partition learn each other's peers again. A peer still unreachable after
  ``forget_after_s`` is forgotten; at most ``MAX_LOST_PEERS`` are remembered (the oldest losses go first).

A node that shut down cleanly is redialed like any other until it is forgotten: cheap (a refused TCP connect), and
it returns by itself if the node restarts at the same address.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from node.net.common import NetError

if TYPE_CHECKING:
    from node.net.host import NetHost

logger = logging.getLogger(__name__)

PING_PROTOCOL_ID: Final = "/ipfs/ping/1.0.0"  # served by every libp2p host
PING_BYTES: Final = 32  # the ping protocol's payload size
MAX_LOST_PEERS: Final = 256
PING_INTERVAL_S: Final = 5.0
PINGS_PER_ROUND: Final = 4  # at most this many peers pinged per interval: the cost stays flat as the network grows
PING_TIMEOUT_S: Final = 10.0  # generous: on a loaded machine a live peer can take seconds to answer
MISSES_TO_DROP: Final = 2  # consecutive unanswered pings before a connection counts as dead
FORGET_AFTER_S: Final = 600.0  # 10 minutes of failed redials and a lost peer is given up on
MAX_ADDRS_PER_PEER: Final = 8


@dataclass(slots=True)
class LostPeer:
    addrs: list[str]  # full multiaddrs ending in /p2p/<peer id>
    lost_at: float  # trio time
    next_try: float
    delay: float
    attempts: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LivenessStatistics:
    silent_dropped: int  # connections dropped because a ping went unanswered
    lost: int  # peers now being redialed
    redialed: int  # successful redials
    forgotten: int  # lost peers given up on after forget_after_s
    pings: int  # pings sent


class PeerKeeper:
    """State of :func:`keep_peers` (exposed for its statistics)."""

    def __init__(self, host: NetHost, *, interval_s: float = PING_INTERVAL_S, timeout_s: float = PING_TIMEOUT_S,
                 redial_max_s: float = 60.0, forget_after_s: float = FORGET_AFTER_S,
                 pings_per_round: int = PINGS_PER_ROUND) -> None:  # fmt: skip
        self.host = host
        self.interval_s = interval_s
        self.pings_per_round = pings_per_round
        self._pinged_at: dict[str, float] = {}  # connected peers: when each was last pinged (trio time)
        self._pings = 0
        self.timeout_s = timeout_s
        self.redial_max_s = max(redial_max_s, interval_s)
        self.forget_after_s = forget_after_s
        self.lost: dict[str, LostPeer] = {}
        self._misses: dict[str, int] = {}  # consecutive unanswered pings
        self._addrs: dict[str, list[str]] = {}  # how each connected peer can be dialed, kept for when it is lost
        self._silent_dropped = 0
        self._redialed = 0
        self._forgotten = 0

    def statistics(self) -> LivenessStatistics:
        return LivenessStatistics(silent_dropped=self._silent_dropped, lost=len(self.lost), redialed=self._redialed,
                                  forgotten=self._forgotten, pings=self._pings)  # fmt: skip

    def _dial_addrs(self, peer_id: str) -> list[str]:
        try:
            addrs = self.host._host.get_peerstore().addrs(ID.from_base58(peer_id))
        except PeerStoreError:  # no (unexpired) address known: keep what we had
            return []
        return [f"{addr}/p2p/{peer_id}" for addr in addrs if "/p2p/" not in str(addr)][:MAX_ADDRS_PER_PEER]

    def _lose(self, peer_id: str) -> None:
        addrs = self._addrs.pop(peer_id, [])
        if not addrs or peer_id in self.lost:
            return
        now = trio.current_time()
        self.lost[peer_id] = LostPeer(addrs=addrs, lost_at=now, next_try=now + self.interval_s, delay=self.interval_s)
        while len(self.lost) > MAX_LOST_PEERS:
            del self.lost[min(self.lost, key=lambda p: self.lost[p].lost_at)]

    async def ping(self, peer_id: str) -> bool:
        """One ping round trip within ``timeout_s``; False if the peer did not answer (or refused the stream)."""
        payload = secrets.token_bytes(PING_BYTES)
        with trio.move_on_after(self.timeout_s):
            try:
                async with await self.host.open_stream(peer_id, PING_PROTOCOL_ID) as stream:
                    await stream.write(payload)
                    return await stream.read_exactly(PING_BYTES) == payload
            except NetError as exc:
                logger.debug("ping of %s failed: %s", peer_id, exc)
                return False
        return False

    async def _check(self, peer_id: str) -> None:
        if await self.ping(peer_id):
            self._misses.pop(peer_id, None)
            return
        if peer_id not in self.host.connected_peers():
            return  # closed meanwhile: the next round records it as lost
        self._misses[peer_id] = misses = self._misses.get(peer_id, 0) + 1
        if misses < MISSES_TO_DROP:
            return
        del self._misses[peer_id]
        logger.info("peer %s did not answer a ping within %.0f s: dropping the connection", peer_id, self.timeout_s)
        self._silent_dropped += 1
        self._lose(peer_id)
        self.host._dht.routing_table.remove_peer(ID.from_base58(peer_id))
        with trio.move_on_after(self.timeout_s):
            try:
                await self.host.disconnect(peer_id)
            except NetError as exc:
                logger.debug("closing the silent connection to %s: %s", peer_id, exc)
        self._block(peer_id)

    def _block(self, peer_id: str) -> None:
        """Put ``peer_id`` in the swarm's negative dial cache (60 s), so that DHT walks that still name it fail at
        once instead of each waiting out a 10 s dial; our own redials lift it first (``NetHost.connect``)."""
        cache = getattr(self.host._host.get_network(), "_negative_peer_cache", None)  # private in py-libp2p 0.8.1
        if cache is not None:
            cache.mark_failed(peer_id)

    async def probe_forever(self) -> None:
        while True:
            connected = set(self.host.connected_peers())
            for peer_id in set(self._addrs) - connected:
                self._lose(peer_id)  # libp2p closed it
                self._misses.pop(peer_id, None)
            for peer_id in connected:
                self.lost.pop(peer_id, None)  # it came back (it dialed us, or we dialed it for other reasons)
                self._addrs[peer_id] = self._dial_addrs(peer_id) or self._addrs.get(peer_id, [])
            self._pinged_at = {p: t for p, t in self._pinged_at.items() if p in connected}
            now = trio.current_time()
            due = ping_order(connected, self._misses, self._pinged_at)[: self.pings_per_round]
            async with trio.open_nursery() as nursery:
                for peer_id in due:
                    self._pinged_at[peer_id] = now
                    self._pings += 1
                    nursery.start_soon(self._check, peer_id)
            await trio.sleep(self.interval_s)

    async def _redial(self, peer_id: str, lost: LostPeer) -> bool:
        for address in lost.addrs:
            with trio.move_on_after(self.timeout_s):
                try:
                    await self.host.connect(address)
                except NetError as exc:
                    logger.debug("redial of %s at %s failed: %s", peer_id, address, exc)
                    continue
                return True
        return False

    async def _attempt(self, peer_id: str, lost: LostPeer, back: list[str]) -> None:
        lost.attempts += 1
        if await self._redial(peer_id, lost):
            back.append(peer_id)
        else:
            self._block(peer_id)
            lost.delay = min(lost.delay * 2, self.redial_max_s)
            lost.next_try = trio.current_time() + lost.delay

    async def redial_forever(self) -> None:
        while True:
            await trio.sleep(self.interval_s / 2)
            now = trio.current_time()
            for peer_id, lost in list(self.lost.items()):
                if now - lost.lost_at > self.forget_after_s:
                    del self.lost[peer_id]
                    self._forgotten += 1
            due = [(p, lost) for p, lost in self.lost.items() if lost.next_try <= now]
            back: list[str] = []
            async with trio.open_nursery() as nursery:
                for peer_id, lost in due:
                    nursery.start_soon(self._attempt, peer_id, lost, back)
            for peer_id in back:
                logger.info("reconnected to %s", peer_id)
                self.lost.pop(peer_id, None)
                self._redialed += 1
                await self.host._dht.add_peer(ID.from_base58(peer_id))
            if back:
                with trio.move_on_after(3 * self.timeout_s):
                    await self.host._dht.refresh_routing_table()  # learn the peers it knows that we lost too


def ping_order(connected: set[str], misses: dict[str, int], pinged_at: dict[str, float]) -> list[str]:
    """Connected peers in the order to ping them: more missed pings first, then never pinged, then pinged longest
    ago (ties by peer id, so the order is deterministic)."""
    return sorted(connected, key=lambda p: (-misses.get(p, 0), pinged_at.get(p, -math.inf), p))


async def keep_peers(keeper: PeerKeeper) -> None:
    """Run ``keeper``'s probe and redial loops forever (see the module docstring)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.probe_forever)
        nursery.start_soon(keeper.redial_forever)
