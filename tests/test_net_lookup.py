"""LookupTrace: a provider lookup's queries, rounds and hops, counted in the adapter (py-libp2p keeps them private)."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from functools import partial

import trio
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID

from node.net import LookupTrace, NetHost, keep_routing_table, open_host
from protocol.identity import Identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def _key(name: str) -> str:
    return f"/coop/cls/{hashlib.sha256(name.encode()).hexdigest()[:16]}"


async def test_trace_counts_the_hops_of_a_walk_that_starts_from_one_peer() -> None:
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            hosts: list[NetHost] = [
                await stack.enter_async_context(open_host(seed=Identity.generate().seed(), listen=LOOPBACK))
                for _ in range(4)
            ]
            a, b, c, d = hosts
            # b - c - d know each other; `a` knows only b (dialled, not bootstrapped: no table refresh), so every
            # other peer its walk queries was named to it by one it had queried: at least 2 hops, 2 rounds.
            assert await c.bootstrap(b.addrs()) == 1
            assert await d.bootstrap(c.addrs()) == 1
            key = _key("cpu")
            assert await d.provide(key)
            await a.connect(b.addrs()[0])

            trace = LookupTrace()
            assert await a.find_providers(key, 5, trace=trace) == [d.peer_id]
            assert trace.queried >= 2
            assert trace.hops >= 2
            assert 2 <= trace.rounds <= trace.queried
            assert trace.provider_queries >= 1
            assert trace.providers >= 1
            assert 0 < trace.walk_ms <= trace.total_ms
            figures = trace.as_dict()
            assert figures["hops"] == trace.hops
            assert figures["queried"] == trace.queried

            # A lookup without a trace (like the DHT's own refreshes) records nowhere, not in the last one.
            assert await a.find_providers(key, 5) == [d.peer_id]
            assert trace.as_dict() == figures

            # A peer whose routing table already holds the provider's neighbourhood needs a single hop.
            near = LookupTrace()
            assert await c.find_providers(key, 5, trace=near) == [d.peer_id]
            assert near.hops == 1
            assert near.queried >= 1


async def test_keep_routing_table_fills_a_table_left_short_by_the_join() -> None:
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            hosts: list[NetHost] = [
                await stack.enter_async_context(open_host(seed=Identity.generate().seed(), listen=LOOPBACK))
                for _ in range(5)
            ]
            a, b, *others = hosts
            for host in others:
                assert await host.bootstrap(b.addrs()) == 1
            # `a` only dials b, like a join whose routing-table refresh came back empty: its table stays short.
            await a.connect(b.addrs()[0])
            assert a.routing_table_size() < 3
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(keep_routing_table, a, min_peers=3, first_delay_s=0.05))
                while a.routing_table_size() < 3:  # noqa: ASYNC110 (libp2p's routing table has no change event)
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert set(a.routing_table_peers()) >= {b.peer_id}


async def test_a_node_serves_more_dht_queries_at_once_than_the_twelve_py_libp2p_allows() -> None:
    """py-libp2p resets every inbound DHT stream past 12 in progress. When handlers wait for a CPU (30 nodes
    starting on two cores), ADD_PROVIDERs, PUT_VALUEs and FIND_NODEs were reset in bursts. Here 20 FIND_NODEs held
    in b's handler at once are all answered."""
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            a, b, c = [
                await stack.enter_async_context(open_host(seed=Identity.generate().seed(), listen=LOOPBACK))
                for _ in range(3)
            ]
            assert await c.bootstrap(b.addrs()) == 1  # b's table holds c: every answer should name it
            await a.connect(b.addrs()[0])
            release, all_in = trio.Event(), trio.Event()
            held = 0
            serve = b._dht._do_handle_stream

            async def slow(stream):  # a handler that waits for a CPU
                nonlocal held
                held += 1
                if held >= 20:
                    all_in.set()
                await release.wait()
                await serve(stream)

            b._dht._do_handle_stream = slow  # type: ignore[method-assign]
            answers: list[list[str]] = []

            async def find_node(i: int) -> None:
                target = hashlib.sha256(f"target {i}".encode()).digest()
                peers = await a._dht.peer_routing._query_peer_for_closest(ID.from_base58(b.peer_id), target)
                answers.append([p.to_base58() for p in peers])

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(find_node, i)
                with trio.fail_after(10):  # with py-libp2p's 12, the other 8 are reset and never get here
                    await all_in.wait()
                release.set()
            assert len(answers) == 20
            assert all(c.peer_id in answer for answer in answers), answers


async def test_a_nearby_lookup_asks_the_closest_peers_it_knows_and_walks_only_when_its_table_lacks_them() -> None:
    """Shard keys are not full, so `find_providers(nearby=True)` asks the 4 closest peers of our routing table,
    with no FIND_NODE walk. When their answers name closer peers we did not know, it walks instead."""
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            hosts: list[NetHost] = [
                await stack.enter_async_context(open_host(seed=Identity.generate().seed(), listen=LOOPBACK))
                for _ in range(11)
            ]
            hub, *rest = hosts[:10]
            outsider = hosts[10]
            for host in rest:
                assert await host.bootstrap(hub.addrs()) == 1
            key = _key("cpu#3")
            by_distance = [
                p.to_base58()
                for p in sort_peer_ids_by_distance(key.encode(), [ID.from_base58(h.peer_id) for h in rest])
            ]
            provider = next(h for h in rest if h.peer_id == by_distance[0])
            assert await provider.provide(key)

            # A node whose table holds the whole network: one round of GET_PROVIDERS, no walk.
            knows_all = rest[-1] if rest[-1] is not provider else rest[-2]
            await knows_all._dht.refresh_routing_table()
            assert knows_all.routing_table_size() >= 8
            trace = LookupTrace()
            assert await knows_all.find_providers(key, 5, trace=trace, nearby=True) == [provider.peer_id]
            assert trace.queried == 0
            assert trace.provider_queries == 4

            # A node that knows the hub and the three peers farthest from the key: the hub names closer peers.
            far = [h for h in rest if h.peer_id in by_distance[-3:]]
            for host in [hub, *far]:  # as if learnt one by one: connect() alone adds no peer to the table
                await outsider.connect(host.addrs()[0])
                table = outsider._dht.routing_table
                assert await table.add_peer(ID.from_base58(host.peer_id), skip_server_mode_check=True)
            assert set(outsider.routing_table_peers()) == {h.peer_id for h in [hub, *far]}
            trace = LookupTrace()
            assert await outsider.find_providers(key, 5, trace=trace, nearby=True) == [provider.peer_id]
            assert trace.queried >= 1  # it walked
