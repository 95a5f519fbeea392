"""Connection and stream limits: libp2p's resource manager (``libp2p.rcmgr``), plus the per-peer stream limits
it lacks on the path a stream takes.

Theory of operation: :func:`new_resource_manager` configures rcmgr from :class:`NetLimits` (total connections and
streams, and its per-peer token bucket on new connections); it is passed to ``new_host`` (which otherwise builds
a default one). Every inbound stream then passes :class:`StreamLimiter` in the adapter before its handler runs: a
peer may hold at most ``max_inbound_streams_per_peer`` of them open, and open them no faster than rcmgr's per-peer
token bucket allows; a stream over either limit is reset at once and counted, and other peers are not affected.

Deviations of rcmgr (0.8.1), read from its source and seen in tests/test_limits.py:
    * Its per-peer and per-protocol stream scopes (``acquire_scoped_stream``) are never called by the swarm, and
      ``acquire_stream`` takes no notice of the peer: hence :class:`StreamLimiter`.
    * Past ``max_streams`` a new stream *waits* on a semaphore shared by both directions instead of being refused.
    * Its circuit breaker, once five acquisitions fail, refuses every connection for 60 s, so one abusive peer
      could cut a node off from everyone; its "graceful degradation" rewrites the limits under load. Both are off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from libp2p.peer.id import ID
from libp2p.rcmgr.manager import ResourceLimits, ResourceManager
from libp2p.rcmgr.rate_limiter import create_per_peer_rate_limiter


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class NetLimits:
    """What one peer, and all peers together, may hold of a host (``[limits]`` in config.toml).

    The first four go to libp2p's resource manager (``libp2p.rcmgr``); the per-peer stream limits are enforced by
    the adapter, because rcmgr counts streams only globally on the path a stream takes (its per-peer stream scopes
    are never called by the swarm) and queues, rather than refuses, a stream past its global limit.
    """

    max_connections: int = 512  # connections, all peers (rcmgr); one per peer (ConnectionConfig)
    max_streams: int = 8192  # open streams, all peers and both directions (rcmgr: past it new streams wait)
    connections_per_peer_per_second: float = 2.0  # new connections one peer id may open (rcmgr's token bucket)
    connection_burst_per_peer: float = 20.0
    max_inbound_streams_per_peer: int = 64  # open at once from one peer; past it new ones are reset
    inbound_streams_per_peer_per_second: float = 100.0  # stream opens one peer may sustain (rcmgr's token bucket)
    inbound_stream_burst_per_peer: float = 400.0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) <= 0:
                raise ValueError(f"limit {name} must be positive, got {getattr(self, name)}")


def new_resource_manager(limits: NetLimits) -> ResourceManager:
    """libp2p's resource manager enforcing ``limits``' connection and global stream limits."""
    return ResourceManager(
        limits=ResourceLimits(max_connections=limits.max_connections, max_streams=limits.max_streams),
        connections_per_peer_per_sec=limits.connections_per_peer_per_second,
        burst_connections_per_peer=limits.connection_burst_per_peer,
        enable_circuit_breaker=False,
        enable_graceful_degradation=False,
    )


@final
class StreamLimiter:
    """Inbound streams open per peer (entries at 0 removed) and rcmgr's per-peer token bucket on stream opens."""

    def __init__(self, limits: NetLimits) -> None:
        self._max_open = limits.max_inbound_streams_per_peer
        self._open: dict[str, int] = {}
        self._rate = create_per_peer_rate_limiter(
            refill_rate=limits.inbound_streams_per_peer_per_second,
            capacity=limits.inbound_stream_burst_per_peer,
            max_peers=limits.max_connections,
        )

    def admit(self, peer: ID) -> bool:
        """Count a new inbound stream from ``peer``; False (nothing counted) if it is over a limit."""
        key = peer.to_base58()
        open_now = self._open.get(key, 0)
        if open_now >= self._max_open or not self._rate.try_allow(peer_id=peer):
            return False
        self._open[key] = open_now + 1
        return True

    def release(self, peer: ID) -> None:
        """An admitted stream from ``peer`` ended."""
        key = peer.to_base58()
        left = self._open.get(key, 1) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
