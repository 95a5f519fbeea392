"""Provider hints in the DHT beyond one key's 20: announcing shard keys, and finding through them.

The keys are protocol/records.py's (a main key per class, and :data:`HINT_SHARDS` shard keys for the broad
classes); this module does the I/O over :class:`~node.net.NetHost`. Hints are only hints: the finder confirms each
by fetching the provider's signed ad.

A provider announces its main keys with every ad refresh (node/daemon.py). Its shard keys are announced by
:func:`announce_shards_forever`, a task of its own, so that the extra DHT walks never delay an ad refresh (an ad
that lapses while hints are announced is worse than a hint that comes a little late), and seldom: py-libp2p keeps
provider records for 48 h, so repeating them every ad refresh would only cost walks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from node import net
from protocol.errors import RemoteProtocolError
from protocol.records import HINT_SHARDS, PROVIDERS_PER_KEY, SHARDED_CLASSES, class_key, hint_shard

log = logging.getLogger(__name__)

SHARD_REFRESH_S: Final = 600.0  # re-announce shard keys this often (for nodes that joined near them since)


async def announce_shards(host: net.NetHost, classes: list[str]) -> list[str]:
    """Announce ``host`` under its shard key of each sharded class in ``classes``; returns the keys announced."""
    keys = [class_key(c, hint_shard(host.peer_id)) for c in classes if c in SHARDED_CLASSES]
    for key in keys:
        await host.provide(key)
    return keys


async def announce_shards_forever(
    host: net.NetHost, classes: Callable[[], list[str]], changed: Callable[[], trio.Event], *, every: float
) -> None:
    """Announce the shard keys of ``classes()`` now, then whenever the event ``changed()`` returns is set (the ad's
    classes changed) and at least every ``every`` seconds. Failures are logged and retried at the next turn."""
    while True:
        event = changed()
        try:
            keys = await announce_shards(host, classes())
            log.debug("announced hint shard keys %s", keys)
        except (ValueError, RemoteProtocolError, net.NetError) as exc:
            log.info("could not announce hint shard keys (will retry): %s", exc)
        with trio.move_on_after(every):
            await event.wait()


async def find(
    host: net.NetHost,
    resource_class: str,
    count: int,
    *,
    trace: net.LookupTrace | None = None,
    full_at: int = PROVIDERS_PER_KEY,
) -> list[str]:
    """Peers that announced ``resource_class``, at most ``count``: the main key's, and when it answers ``full_at``
    or more (a storing node keeps 20 per key, so some may be missing) every shard key's too.

    The ``trace`` follows the main key's lookup only.
    """
    hints = await host.find_providers(class_key(resource_class), count, trace=trace)
    if len(hints) < full_at or resource_class not in SHARDED_CLASSES:
        return hints
    found = dict.fromkeys(hints)

    async def shard(n: int) -> None:
        key = class_key(resource_class, n)
        try:
            found.update(dict.fromkeys(await host.find_providers(key, count)))
        except net.NetError as exc:  # one shard fewer: the others still answer
            log.debug("hints of %s failed: %s", key, exc)

    async with trio.open_nursery() as nursery:
        for n in range(HINT_SHARDS):
            nursery.start_soon(shard, n)
    return list(found)[:count]
