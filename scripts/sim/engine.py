"""The event queue and the link model.

Simulated time is Unix milliseconds from :data:`~scripts.sim.population.EPOCH_MS`. Events are ``(time, seq,
callback, args)`` in a heap; ``seq`` breaks ties in scheduling order, so a run is a pure function of the seed.

A message between two nodes takes ``base(a) + base(b) + region distance``, times a random jitter of up to 30 %.
It is lost with probability ``loss`` (the sender's negotiation machine then times out, as over a dead stream)
and delivered twice with probability ``duplication``. The second copy is stopped at the receiver's boundary by
the project's replay defence (:class:`protocol.envelope.NonceCache`), as ``node/market/wire.py`` stops a
replayed envelope; envelopes themselves are not sealed here (see docs/simulation.md, "What is real").
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from protocol.envelope import NonceCache
from protocol.errors import Replayed
from scripts.sim.population import Node

REGION_MS = ((10, 90, 160), (90, 10, 120), (160, 120, 10))


class Engine:
    def __init__(self, rng: random.Random, start: int) -> None:
        self.rng = rng
        self.now = start
        self._queue: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0

    def at(self, when: int, callback: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, callback, args))

    def run_until(self, end: int) -> None:
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, callback, args = heapq.heappop(queue)
            self.now = when
            self.events += 1
            callback(*args)
        self.now = end


class Link:
    """Latency, loss and duplication between nodes, with replay protection at the receiver."""

    def __init__(self, engine: Engine, *, loss: float, duplication: float) -> None:
        self.engine = engine
        self.loss = loss
        self.duplication = duplication
        self.sent = 0
        self.lost = 0
        self.duplicates_dropped = 0
        self._caches: dict[int, NonceCache] = {}
        self._nonce = 0

    def latency_ms(self, a: Node, b: Node) -> float:
        return a.base_latency_ms + b.base_latency_ms + REGION_MS[a.region][b.region]

    def send(self, sender: Node, receiver: Node, deliver: Callable[..., None], *args: Any) -> None:
        """Deliver ``deliver(*args)`` at ``receiver`` after the link's delay, unless lost; maybe twice."""
        rng = self.engine.rng
        self.sent += 1
        if rng.random() < self.loss:
            self.lost += 1
            return
        self._nonce += 1
        nonce = self._nonce.to_bytes(16, "big")
        copies = 2 if rng.random() < self.duplication else 1
        sent = self.engine.now
        for _ in range(copies):
            delay = self.latency_ms(sender, receiver) * (1 + 0.3 * rng.random())
            self.engine.at(self.engine.now + int(delay), self._arrive, sender, receiver, nonce, sent, deliver, args)

    def _arrive(
        self, sender: Node, receiver: Node, nonce: bytes, sent: int, deliver: Callable[..., None], args: Any
    ) -> None:
        cache = self._caches.get(receiver.index)
        if cache is None:
            cache = self._caches[receiver.index] = NonceCache(4096)
        now = self.engine.now
        try:
            cache.check_and_add(
                signer=sender.peer.encode(), nonce=nonce, issued_at=sent, expires_at=sent + 60_000, now=now
            )
        except Replayed:
            self.duplicates_dropped += 1
            return
        deliver(*args)
