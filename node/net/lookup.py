"""Provider lookups (:func:`providers_at_closest`, :func:`providers_nearby`), counting their hops (py-libp2p
0.8.1 does not expose them), and keeping a short routing table filled.

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
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from node.net.common import PROVIDER_QUERY_TIMEOUT_S

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


async def providers_at_closest(dht: Any, raw_key: bytes, trace: LookupTrace | None) -> list[PeerInfo]:
    """Local provider records plus those held by the peers closest to the key (a walk, then GET_PROVIDERS to each).

    ``ProviderStore.find_providers`` returns the local records alone whenever there are any, so a node that
    provides a key itself (or heard of one provider) never sees the others. Provider records are stored at
    the k peers closest to the key, so we find those peers and ask each, merging with the local records.
    """
    started = time.perf_counter()
    store = dht.provider_store
    infos: list[PeerInfo] = list(store.get_providers(raw_key))
    closest = await dht.peer_routing.find_closest_peers_network(raw_key)
    if trace is not None:
        trace.walk_ms = elapsed_ms(started)
    await _ask_providers(dht, raw_key, [p for p in closest if p != dht.host.get_id()], infos, set(), trace)
    if trace is not None:
        trace.providers, trace.total_ms = len(infos), elapsed_ms(started)
    return infos


NEARBY_ASK: Final = 4  # peers a nearby lookup asks (of the ~20 that store a key's provider records)


async def providers_nearby(
    dht: Any, raw_key: bytes, trace: LookupTrace | None, *, ask: int = NEARBY_ASK
) -> list[PeerInfo] | None:
    """Provider records of a key that is not full, from the ``ask`` closest peers in our routing table, no walk.

    Every one of the ~k peers closest to a key stores its provider records, so while a key holds fewer than k
    providers (a shard key, ``protocol/records.py``) any few of them answer alike. A find asks 8 shard keys, and
    a walk plus GET_PROVIDERS to 20 peers each was 240 streams per find, two thirds of an N = 30 find's time on a
    loaded machine (docs/benchmarks.md, "Discovery", fourth round). GET_PROVIDERS answers also name the closer
    peers the asked peer knows: when one of those ranks among the ``ask`` closest and we did not know it, our
    table lacks the key's neighbourhood (a large network), and we return None for a full lookup instead. Also
    None when the table holds fewer than ``ask`` peers or fewer than half of those asked answer.
    """
    started = time.perf_counter()
    me = dht.host.get_id()
    asked = [p for p in dht.routing_table.find_local_closest_peers(raw_key, ask) if p != me]
    if len(asked) < ask:
        return None
    infos: list[PeerInfo] = list(dht.provider_store.get_providers(raw_key))
    named: set[ID] = set()
    answered = await _ask_providers(dht, raw_key, asked, infos, named, trace)
    nearest = sort_peer_ids_by_distance(raw_key, list((set(asked) | named) - {me}))[:ask]
    if answered * 2 < len(asked) or not set(nearest) <= set(asked):
        return None
    if trace is not None:
        trace.providers, trace.total_ms = len(infos), elapsed_ms(started)
    return infos


async def _ask_providers(
    dht: Any, raw_key: bytes, peers: list[ID], infos: list[PeerInfo], named: set[ID], trace: LookupTrace | None
) -> int:
    """GET_PROVIDERS to each of ``peers`` at once: records into ``infos``, closer peers into ``named``; answers."""
    store = dht.provider_store
    answered = 0

    async def ask(peer: ID) -> None:
        nonlocal answered
        # The private helper catches (and logs) every error itself and returns ([], []) then.
        with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
            providers, closer = await store._get_providers_from_peer_with_closers(peer, raw_key)
            infos.extend(providers)
            named.update(closer)
            answered += bool(providers or closer)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(ask, peer)
            if trace is not None:
                trace.provider_queries += 1
    return answered


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
