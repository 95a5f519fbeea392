"""Provider hints in the DHT: announcing a resource class, and finding who announced it.

The keys (an hour's window, a main key and shard keys per class) are protocol/records.py's; this module does the
I/O over :class:`~node.net.NetHost`. Hints are only hints: the finder confirms each by fetching its signed ad.
"""

from __future__ import annotations

import logging

import trio

from node import net
from protocol.records import (
    HINT_SHARDS,
    PROVIDERS_PER_KEY,
    class_key,
    hint_epoch,
    hint_key_epoch,
    provider_hint_keys,
)

log = logging.getLogger(__name__)


async def announce(host: net.NetHost, resource_classes: list[str], *, now_ms: int, lead_ms: int, skew_ms: int) -> None:
    """Announce ``host`` as a provider of each class (main and shard key of this window, and of the next one
    within ``lead_ms`` of it), and forget the hints of windows nobody asks for any more."""
    for resource_class in resource_classes:
        for key in provider_hint_keys(resource_class, host.peer_id, now_ms=now_ms, lead_ms=lead_ms):
            # One at a time: run concurrently from one host, py-libp2p's provides lost ADD_PROVIDERs (in
            # tests/test_hints.py a key then listed 3 providers where the cap allows 2 and every node got the same
            # first two), so storing nodes saw announcements in different orders.
            await host.provide(key)
    oldest = hint_epoch(now_ms - skew_ms) - 1  # a finder whose clock is behind may still ask the last window
    host.forget_provider_keys(lambda key: (epoch := hint_key_epoch(key)) is not None and epoch < oldest)


async def find(
    host: net.NetHost,
    resource_class: str,
    *,
    now_ms: int,
    count: int,
    trace: net.LookupTrace | None = None,
    full_at: int = PROVIDERS_PER_KEY,
) -> list[str]:
    """Peers that announced ``resource_class`` in this window: the main key, and when it answers ``full_at`` or
    more (a storing node keeps 20 per key, so some may be missing) every shard key too. At most ``count``.

    The ``trace`` follows the main key's lookup only.
    """
    epoch = hint_epoch(now_ms)
    hints = await host.find_providers(class_key(resource_class, epoch=epoch), count, trace=trace)
    if len(hints) < full_at:
        return hints
    found = dict.fromkeys(hints)

    async def shard(n: int) -> None:
        key = class_key(resource_class, epoch=epoch, shard=n)
        try:
            found.update(dict.fromkeys(await host.find_providers(key, count)))
        except net.NetError as exc:  # one shard fewer: the others still answer
            log.debug("hints of %s failed: %s", key, exc)

    async with trio.open_nursery() as nursery:
        for n in range(HINT_SHARDS):
            nursery.start_soon(shard, n)
    return list(found)[:count]
