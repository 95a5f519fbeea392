"""Joining the peers that mDNS finds on the LAN, as if they were bootstrap peers.

Theory of operation: ``node/net/mdns.py`` hands over validated announcements (:class:`~node.net.LanPeer`: an
Ed25519 peer id and private/link-local ``/p2p/`` addresses). :meth:`LanJoiner.serve` dials each new one, at most
:data:`LAN_DIALS_AT_ONCE` at a time and each within :data:`LAN_DIAL_TIMEOUT_S`, and on success adds it to the
routing table and refreshes the table, exactly as a bootstrap peer is joined (``NetHost.bootstrap``). The dial is
what authenticates the announcement: Noise proves that the peer holds the announced id's key.

Bounds, because announcements are unauthenticated input: at most :data:`MAX_LAN_PEERS` peers joined through mDNS
(further ones are ignored and counted); a peer is not redialled while a dial to it is in flight or it is joined;
a peer whose every address failed may be retried on its next announcement; the table of peers is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from node import net

logger = logging.getLogger(__name__)

MAX_LAN_PEERS: Final = 32  # peers joined through mDNS; the config template says the same
LAN_DIALS_AT_ONCE: Final = 4
LAN_DIAL_TIMEOUT_S: Final = 10.0  # per address
_MAX_TABLE: Final = 2 * MAX_LAN_PEERS  # joined, dialling and a few failed ones


@dataclass
class LanPeerState:
    peer_id: str
    state: str = "dialling"  # dialling, joined, unreachable
    address: str = ""
    last_error: str = ""


class LanJoiner:
    """Dials and joins the peers that mDNS announces. ``say`` prints a line to the node's output."""

    def __init__(self, host: net.NetHost, *, say: Callable[[str], None]) -> None:
        self.host = host
        self.say = say
        self.peers: dict[str, LanPeerState] = {}
        self.ignored = 0  # announcements of new peers past MAX_LAN_PEERS

    async def serve(self) -> None:
        """Join announced peers until cancelled (returns at once when mDNS is not running)."""
        lan = self.host.lan
        if lan is None:
            return
        limiter = trio.CapacityLimiter(LAN_DIALS_AT_ONCE)
        async with trio.open_nursery() as nursery:
            async for candidate in lan.peers:
                known = self.peers.get(candidate.peer_id)
                if known is not None and known.state != "unreachable":
                    continue
                if known is None and sum(p.state != "unreachable" for p in self.peers.values()) >= MAX_LAN_PEERS:
                    self.ignored += 1
                    continue
                if known is None and len(self.peers) >= _MAX_TABLE:
                    failed = next((pid for pid, p in self.peers.items() if p.state == "unreachable"), None)
                    if failed is None:
                        self.ignored += 1
                        continue
                    del self.peers[failed]
                state = LanPeerState(candidate.peer_id)
                self.peers[candidate.peer_id] = state
                nursery.start_soon(self._join, candidate, state, limiter)

    async def _join(self, candidate: net.LanPeer, state: LanPeerState, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            for address in candidate.addrs:
                with trio.move_on_after(LAN_DIAL_TIMEOUT_S) as late:
                    try:
                        await self.host.connect(address)  # Noise: the peer must hold the announced id's key
                        await self.host.bootstrap([address])  # routing table + refresh, as for a bootstrap peer
                    except net.NetError as exc:
                        state.last_error = str(exc)
                        logger.debug("LAN peer %s not reachable at %s: %s", candidate.peer_id, address, exc)
                        continue
                    state.state, state.address, state.last_error = "joined", address, ""
                    self.say(f"found {candidate.peer_id} on the LAN (mDNS) at {address}")
                    return
                if late.cancelled_caught:
                    state.last_error = f"no answer from {address} within {LAN_DIAL_TIMEOUT_S:.0f} s"
            state.state = "unreachable"

    def status(self) -> dict[str, Any]:
        """The ``mdns`` part of ``node status``."""
        lan = self.host.lan
        stats = lan.statistics() if lan is not None else net.MdnsStatistics()
        connected = set(self.host.connected_peers())
        return {
            "state": self.host.mdns_state,
            "announcements": stats.announcements,
            "refused": stats.refused,
            "dropped": stats.dropped,
            "ignored": self.ignored,
            "peers": [
                {
                    "peer_id": p.peer_id,
                    "state": p.state,
                    "address": p.address,
                    "connected": p.peer_id in connected,
                    "last_error": p.last_error,
                }
                for p in self.peers.values()
            ],
        }
