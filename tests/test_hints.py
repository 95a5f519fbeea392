"""Provider hints through shard keys (node/hints.py) on real in-process libp2p hosts: more providers than a DHT
key holds.

py-libp2p's storing nodes keep the first k = 20 providers of a key and drop later ones. Twenty-odd providers in
one process would be slow (docs/libp2p-facts.md, trap 11), so the DHT tests lower that cap to 2 (the module's
``BUCKET_SIZE``, which ``add_provider`` reads at call time) and use 6 providers: the same overflow, smaller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import libp2p.kad_dht.provider_store
import pytest
import trio
import trio.testing

from node import hints
from node.net import NetHost, open_host
from protocol.identity import Identity
from protocol.records import class_key, hint_shard

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CAP = 2
PROVIDERS = 6


def identities_in_distinct_shards(n: int) -> list[Identity]:
    """Identities whose hint shards differ, so no shard key overflows the lowered cap."""
    chosen: dict[int, Identity] = {}
    while len(chosen) < n:
        identity = Identity.generate()
        chosen.setdefault(hint_shard(identity.peer_id), identity)
    return list(chosen.values())


@asynccontextmanager
async def network(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[NetHost, list[NetHost]]]:
    """A finder and PROVIDERS providers, all joined through the first provider."""
    monkeypatch.setattr(libp2p.kad_dht.provider_store, "BUCKET_SIZE", CAP)
    async with AsyncExitStack() as stack:
        providers = [
            await stack.enter_async_context(open_host(seed=identity.seed(), listen=LOOPBACK))
            for identity in identities_in_distinct_shards(PROVIDERS)
        ]
        finder = await stack.enter_async_context(open_host(seed=Identity.generate().seed(), listen=LOOPBACK))
        for host in [*providers[1:], finder]:
            assert await host.bootstrap(providers[0].addrs()) == 1
        yield finder, providers


async def test_a_class_lists_more_providers_than_one_key_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(60):
        async with network(monkeypatch) as (finder, providers):
            for provider in providers:  # one at a time: every storing node keeps the same first two
                assert await hints.announce(provider, ["cpu", "mem:8g"]) == [
                    class_key("cpu"),
                    class_key("mem:8g"),
                    class_key("cpu", hint_shard(provider.peer_id)),  # a narrow class has no shards
                ]
            assert len(await finder.find_providers(class_key("cpu"), 100)) == CAP  # one key lists two of six

            found = await hints.find(finder, "cpu", 100, full_at=CAP)
            assert sorted(found) == sorted(p.peer_id for p in providers)  # the shard keys hold the rest
            assert len(await hints.find(finder, "cpu", 3, full_at=CAP)) == 3


async def test_a_main_key_that_is_not_full_is_the_whole_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(60):
        async with network(monkeypatch) as (finder, providers):
            await providers[0].provide(class_key("gpu"))
            for provider in providers:
                await provider.provide(class_key("gpu", hint_shard(provider.peer_id)))
            # One provider on the main key: below the cap, so the shards (which list all six) are not asked.
            assert await hints.find(finder, "gpu", 100, full_at=CAP) == [providers[0].peer_id]


class RecordingHost:
    """Stands in for a NetHost where only the schedule of announcements is under test."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.provided: list[tuple[float, str]] = []

    async def provide(self, key: str) -> bool:
        self.provided.append((trio.current_time(), key))
        return True


async def test_hints_are_announced_at_start_on_change_and_ever_less_often(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host = RecordingHost(Identity.generate().peer_id)
    shard = hint_shard(host.peer_id)
    classes = ["cpu"]
    changed = trio.Event()
    cpu = [class_key("cpu"), class_key("cpu", shard)]
    async with trio.open_nursery() as nursery:
        announce = partial(hints.announce_forever, first_interval=60.0, max_interval=600.0)
        await nursery.start(announce, host, lambda: classes, lambda: changed)
        assert host.provided == [(0.0, k) for k in cpu]  # before it reports started (the node says ready after)
        await trio.sleep(30)
        classes = ["cpu", "gpu", "gpu:nvidia-a100"]  # a GPU is offered now
        changed.set()
        changed = trio.Event()
        await trio.sleep(1)
        gpu = [
            class_key("cpu"),
            class_key("gpu"),
            class_key("gpu:nvidia-a100"),
            *(class_key(c, shard) for c in ["cpu", "gpu"]),
        ]
        assert host.provided[2:] == [(30.0, k) for k in gpu]
        await trio.sleep(3000)
        nursery.cancel_scope.cancel()
    turns = sorted({t for t, _key in host.provided})
    assert turns == [0.0, 30.0, 150.0, 390.0, 870.0, 1470.0, 2070.0, 2670.0]  # +120, 240, 480, then 600 s each
