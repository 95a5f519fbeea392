"""Provider hints (node/hints.py) on real in-process libp2p hosts: more providers than a DHT key can hold.

py-libp2p's storing nodes keep the first k = 20 providers of a key and drop later ones. Twenty-odd providers in
one process would be slow (docs/libp2p-facts.md, trap 11), so these tests lower that cap to 2 (the module's
``BUCKET_SIZE``, which ``add_provider`` reads at call time) and use 6 providers: the same overflow, smaller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import libp2p.kad_dht.provider_store
import pytest
import trio

from node import hints
from node.net import NetHost, open_host
from protocol.identity import Identity
from protocol.records import HINT_EPOCH_MS, class_key, hint_key_epoch, hint_shard

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CAP = 2
NOW = 1_780_000_000_000  # mid-hour: 1_780_000_000_000 % HINT_EPOCH_MS is 1,600,000 ms into the window
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
                await hints.announce(provider, ["cpu"], now_ms=NOW, lead_ms=0, skew_ms=0)
            main = class_key("cpu", epoch=NOW // HINT_EPOCH_MS)
            assert len(await finder.find_providers(main, 100)) == CAP  # the cap: one key lists two of six

            found = await hints.find(finder, "cpu", now_ms=NOW, count=100, full_at=CAP)
            assert sorted(found) == sorted(p.peer_id for p in providers)  # the shard keys hold the rest
            assert len(await hints.find(finder, "cpu", now_ms=NOW, count=3, full_at=CAP)) == 3

            # A main key that is not full is the whole answer: no shard lookups for a small class.
            assert await hints.find(finder, "gpu", now_ms=NOW, count=100, full_at=CAP) == []


async def test_hints_live_in_hour_windows_and_old_ones_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(60):
        async with network(monkeypatch) as (finder, providers):
            early, late = providers[0], providers[1]
            await hints.announce(early, ["cpu"], now_ms=NOW, lead_ms=0, skew_ms=0)
            assert await hints.find(finder, "cpu", now_ms=NOW, count=10) == [early.peer_id]
            next_hour = NOW + HINT_EPOCH_MS
            assert await hints.find(finder, "cpu", now_ms=next_hour, count=10) == []  # gone with its window

            # Close to the end of a window a provider announces the next one too, so finders find it there.
            end_of_hour = (NOW // HINT_EPOCH_MS + 1) * HINT_EPOCH_MS - 5_000
            await hints.announce(late, ["cpu"], now_ms=end_of_hour, lead_ms=10_000, skew_ms=0)
            assert await hints.find(finder, "cpu", now_ms=next_hour, count=10) == [late.peer_id]

            # Two windows on, every node drops the hints of windows before the last from its store (and stops
            # republishing its own): nobody asks for them any more.
            store = late._dht.provider_store
            epochs = {hint_key_epoch(k.decode()) for k in store.providers}
            assert NOW // HINT_EPOCH_MS in epochs
            await hints.announce(late, ["cpu"], now_ms=NOW + 2 * HINT_EPOCH_MS, lead_ms=0, skew_ms=0)
            epochs = {hint_key_epoch(k.decode()) for k in store.providers} | {
                hint_key_epoch(k.decode()) for k in store.providing_keys
            }
            assert min(epochs) == NOW // HINT_EPOCH_MS + 1
