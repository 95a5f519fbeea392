"""LookupTrace: a provider lookup's queries, rounds and hops, counted in the adapter (py-libp2p keeps them private)."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from functools import partial

import trio
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
