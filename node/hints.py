"""Provider hints in the DHT: announcing a provider's resource classes, and finding who announced one.

The keys are protocol/records.py's (a main key per class, and :data:`HINT_SHARDS` shard keys for the broad
classes, past the 20 providers one key holds); this module does the I/O over :class:`~node.net.NetHost`. Hints
are only hints: the finder confirms each by fetching the provider's signed ad.

A provider's hints are announced by :func:`announce_forever`, a task apart from the ad refresh (node/daemon.py):

* an ad is a signed record that expires and must be re-put every refresh; a hint is a provider record that
  py-libp2p's storing nodes keep 48 h. Re-announcing every class with every ad (one DHT walk and 20 stores per
  key) was two thirds of an idle provider's DHT walks, for records that were still held.
* an ad that lapses while hint walks run is worse than a hint that comes a little late: when the hints were
  announced inside the refresh, ads with short TTLs lapsed under load (the first sharding attempt, reverted).

Hints go out as the node starts (before it says ready), whenever the ad's classes change, and again after one ad
refresh, doubling up to every 10 min: a young node's neighbourhood changes most (peers joining near the keys
that did not hold the first announcement), an old one's rarely.
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

MAX_ANNOUNCE_INTERVAL_S: Final = 600.0


def hint_keys(peer_id: str, classes: list[str]) -> list[str]:
    """The keys a provider of ``classes`` announces: each class's main key, then its shard key of the broad ones."""
    shard = hint_shard(peer_id)
    return [class_key(c) for c in classes] + [class_key(c, shard) for c in classes if c in SHARDED_CLASSES]


async def announce(host: net.NetHost, classes: list[str]) -> list[str]:
    """Announce ``host`` as a provider of ``classes`` (:func:`hint_keys`, one at a time); returns the keys."""
    keys = hint_keys(host.peer_id, classes)
    for key in keys:
        await host.provide(key)
    return keys


async def announce_forever(
    host: net.NetHost,
    classes: Callable[[], list[str]],
    changed: Callable[[], trio.Event],
    *,
    first_interval: float,
    max_interval: float = MAX_ANNOUNCE_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce the hints of ``classes()`` now (then report started), again whenever the event ``changed()`` returns
    is set (the ad's classes changed), and after ``first_interval`` seconds, doubling up to ``max_interval``.
    A failure is logged and retried at the next turn."""
    interval = first_interval
    started = False
    while True:
        event = changed()
        try:
            keys = await announce(host, classes())
            log.debug("announced provider hints %s", keys)
        except (ValueError, RemoteProtocolError, net.NetError) as exc:
            log.info("could not announce provider hints (will retry): %s", exc)
        if not started:
            task_status.started()
            started = True
        with trio.move_on_after(interval):
            await event.wait()
        interval = min(interval * 2, max_interval)


async def find(
    host: net.NetHost,
    resource_class: str,
    count: int,
    *,
    trace: net.LookupTrace | None = None,
    full_at: int = PROVIDERS_PER_KEY,
) -> list[str]:
    """Peers that announced ``resource_class``, at most ``count``: the main key's, and when it answers ``full_at``
    or more (a storing node keeps 20 per key, so some may be missing) every shard key's too. A shard key is not
    full, so it is asked of the few closest peers we know, without a walk (``NetHost.find_providers(nearby=True)``).

    The ``trace`` follows the main key's lookup only.
    """
    hints = await host.find_providers(class_key(resource_class), count, trace=trace)
    if len(hints) < full_at or resource_class not in SHARDED_CLASSES:
        return hints
    found = dict.fromkeys(hints)

    async def shard(n: int) -> None:
        key = class_key(resource_class, n)
        try:
            found.update(dict.fromkeys(await host.find_providers(key, count, nearby=True)))
        except net.NetError as exc:  # one shard fewer: the others still answer
            log.debug("hints of %s failed: %s", key, exc)

    async with trio.open_nursery() as nursery:
        for n in range(HINT_SHARDS):
            nursery.start_soon(shard, n)
    return list(found)[:count]
