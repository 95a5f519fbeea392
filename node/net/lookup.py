"""Counting the hops of a DHT lookup, which py-libp2p 0.8.1 does not expose; keeping a short routing table filled.

``PeerRouting.find_closest_peers_network`` (the iterative FIND_NODE walk under ``find_providers`` and
``get_value``) keeps its round and query counts in locals and only logs them at INFO. So :func:`instrument` wraps
the one method every query of the walk goes through, ``_query_peer_for_closest(peer, key)``, on the DHT's own
``PeerRouting`` instance. A caller that wants a lookup's figures passes a :class:`LookupTrace` to
:meth:`~node.net.host.NetHost.find_providers`, which puts it in a context variable for the lookup's duration; trio
copies the context into the child tasks the walk spawns, so every query of that lookup (and of no other: the DHT's
own refreshes run in tasks of their own) is recorded in it.

What is counted, per query: the peer asked and what it answered. A peer's hop is 1 if the walk started from it
(our routing table) and one more than the hop of the first peer that named it otherwise; the lookup's ``hops`` is
the largest hop of any peer queried (a walk that only asks routing-table peers is 1 hop). ``rounds`` are the walk's
batches of up to ALPHA (10) parallel queries: one round waits for all its queries, so a query that starts while
none is in flight starts a round.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio
from libp2p.peer.id import ID

if TYPE_CHECKING:
    from node.net.host import NetHost

_CURRENT: Final = contextvars.ContextVar["LookupTrace | None"]("coop_lookup_trace", default=None)


@dataclass(slots=True)
class LookupTrace:
    """One provider lookup's figures. Fill one by passing it to ``NetHost.find_providers(..., trace=t)``.

    Attributes:
        queried: FIND_NODE queries sent (one per peer).
        rounds: batches of parallel FIND_NODE queries (see the module docstring).
        hops: longest chain of peers, each named by the one before, that the walk queried (1: routing table only).
        provider_queries: GET_PROVIDERS queries sent to the closest peers found.
        providers: provider records received (before deduplication), the local store's included.
        walk_ms / total_ms: the FIND_NODE walk, and the whole lookup with GET_PROVIDERS.
    """

    queried: int = 0
    rounds: int = 0
    hops: int = 0
    provider_queries: int = 0
    providers: int = 0
    walk_ms: float = 0.0
    total_ms: float = 0.0
    _hop: dict[ID, int] = field(default_factory=dict)
    _in_flight: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The public figures, for JSON."""
        return {
            "queried": self.queried,
            "rounds": self.rounds,
            "hops": self.hops,
            "provider_queries": self.provider_queries,
            "providers": self.providers,
            "walk_ms": round(self.walk_ms, 1),
            "total_ms": round(self.total_ms, 1),
        }

    def _start(self, peer: ID) -> int:
        if self._in_flight == 0:
            self.rounds += 1
        self._in_flight += 1
        self.queried += 1
        hop = self._hop.setdefault(peer, 1)
        self.hops = max(self.hops, hop)
        return hop

    def _done(self, hop: int, named: list[ID]) -> None:
        self._in_flight -= 1
        for peer in named:
            self._hop.setdefault(peer, hop + 1)


def current() -> LookupTrace | None:
    """The trace of the lookup this task is part of, if any."""
    return _CURRENT.get()


def activate(trace: LookupTrace | None) -> contextvars.Token[LookupTrace | None]:
    """Make ``trace`` the current one (for this task and those it spawns); undo with :func:`deactivate`."""
    return _CURRENT.set(trace)


def deactivate(token: contextvars.Token[LookupTrace | None]) -> None:
    _CURRENT.reset(token)


def instrument(peer_routing: Any) -> None:
    """Wrap ``peer_routing._query_peer_for_closest`` (that instance only) to record into the current trace."""
    original: Callable[[ID, bytes], Awaitable[list[ID]]] = peer_routing._query_peer_for_closest

    async def query(peer: ID, target_key: bytes) -> list[ID]:
        trace = _CURRENT.get()
        if trace is None:
            return await original(peer, target_key)
        hop, named = trace._start(peer), []
        try:
            named = await original(peer, target_key)
            return named
        finally:
            trace._done(hop, named)

    peer_routing._query_peer_for_closest = query


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


ROUTING_TABLE_MIN_PEERS: Final = 5  # below this, a node keeps refreshing its routing table (with back-off)


async def keep_routing_table(
    host: NetHost, *, min_peers: int = ROUTING_TABLE_MIN_PEERS, first_delay_s: float = 5.0, max_delay_s: float = 60.0
) -> None:
    """Refresh the routing table again, backing off, while it holds fewer than ``min_peers`` peers. Runs forever.

    A node refreshes its table once, when it joins (``NetHost.bootstrap``). On a loaded machine that refresh can
    come back empty (every FIND_NODE past py-libp2p's 10 s timeout), and the node then kept its bootstrap peer
    alone for good: at N = 100 on 2 cores, finds from such nodes queried that one peer and found 0-1 of 99
    providers (docs/benchmarks.md, "Discovery"). py-libp2p refreshes on its own only every 10 minutes. The delay
    doubles after each refresh that leaves the table short, up to ``max_delay_s``, and starts over once it is not.
    A node with no connections has nobody to ask and just waits.
    """
    delay = first_delay_s
    while True:
        await trio.sleep(delay)
        if host.routing_table_size() >= min_peers:
            delay = first_delay_s
            continue
        if host.connected_peers():
            await host._dht.refresh_routing_table()
        delay = min(delay * 2, max_delay_s)
