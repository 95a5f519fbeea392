"""Finding providers: hints from the DHT, each confirmed by the provider's signed capacity ad.

Theory of operation. A find asks the DHT who announced the wanted resource class (:mod:`node.hints`), then
confirms each hint with the provider's current signed ad and keeps those whose ad satisfies the query.

An ad is fetched from the provider itself first (``/coop/ad/1.0.0``: the provider answers with the very bytes it
put in the DHT, and we dial it next anyway to ask for a quote); the DHT copy under ``/coop/cap/<hash>`` is the
fallback for a provider we cannot reach directly or that is slow to answer (:meth:`Finder.fetch_ad`). Either way
the record is validated as a DHT record is: signature, signer = the peer we asked about, unexpired. Fetching every
ad from the DHT was one walk per provider per find: at 30 nodes a find took 16-60 s and lost a quarter of the
providers to walk timeouts (docs/benchmarks.md, "Discovery").

Two caches keep a busy client off the network: a verified ad is reused for :data:`AD_CACHE_S` (never past its
expiry), and a job's answer (:meth:`Finder.find_peer_ids`) for :data:`FIND_CACHE_S`; jobs that miss the answer
cache together share one find.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import trio

from node import hints, net
from node.api import FindQuery
from node.capacity.summary import gpu_model_matches
from node.market.wire import FrameChannel
from protocol import codec
from protocol.errors import RemoteProtocolError
from protocol.market import runtime_mismatch
from protocol.messages import CapacityAd, Resources
from protocol.records import AD_PROTOCOL_ID, AD_RECORD_MAX_BYTES, VerifiedAd, cap_key, validate_ad_record

logger = logging.getLogger(__name__)

AD_DIRECT_TIMEOUT_S: Final = 3.0  # the provider alone is asked for its ad this long, then the DHT too ...
FIND_LOOKUP_TIMEOUT_S: Final = 5.0  # ... for at most this much longer
FIND_CACHE_S: Final = 3.0
FIND_PROVIDERS_PER_CLASS: Final = 100
# A provider's verified ad is reused this long (never past its expiry). Its load figure may be this much older;
# the quote that follows is always fresh.
AD_CACHE_S: Final = 30.0


@dataclass
class FindStages:
    """Where one find's time went (``/v1/find``'s ``lookup``, scripts/bench/discovery.py).

    ``hints_ms``: the main class key's lookup and, when its answer is full, the shard keys'; ``ads_ms``: confirming
    the hints; the ``ads_*`` counts say where each confirmed ad came from, ``direct_failed`` why a provider's own
    answer was not used (``dial``, ``no-ad``, ``invalid``, ``timeout``).
    """

    hints_ms: float = 0.0
    ads_ms: float = 0.0
    ads_cached: int = 0
    ads_direct: int = 0
    ads_dht: int = 0
    ads_missing: int = 0
    direct_failed: dict[str, int] = field(default_factory=dict)  # why a provider's own answer was not used

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def ad_matches(ad: CapacityAd, query: FindQuery) -> bool:
    if ad.cpus < query.cpus or ad.memory_bytes < query.memory_bytes or len(ad.gpus) < query.gpus:
        return False
    if query.runtime:
        wanted = Resources(runtime=query.runtime, runtime_sha256=query.runtime_sha256)
        if runtime_mismatch(ad.runtimes, wanted):
            return False
    if query.gpu_model:
        return sum(1 for g in ad.gpus if gpu_model_matches(g.model, query.gpu_model)) >= max(query.gpus, 1)
    return True


def ad_to_json(ad: CapacityAd, *, expires_at_ms: int) -> dict[str, Any]:
    return {
        "peer_id": ad.peer,
        "seq": ad.seq,
        "cpus": ad.cpus,
        "memory_bytes": ad.memory_bytes,
        "disk_bytes": ad.disk_bytes,
        "gpus": [{"model": g.model, "memory_bytes": g.memory_bytes} for g in ad.gpus],
        "sandbox_tier": ad.sandbox_tier,
        "runtimes": [
            {"name": r.name, "interpreter": r.interpreter, "lock_sha256": r.lock_sha256.hex()} for r in ad.runtimes
        ],
        "load_permille": ad.load_permille,
        "price_sheet": codec.to_plain(ad.price_sheet),
        "addrs": list(ad.addrs),
        "expires_at_ms": expires_at_ms,
        "verified": True,
    }


async def serve_ad(record: Callable[[], bytes | None], channel: FrameChannel) -> None:
    """Provider side of ``/coop/ad/1.0.0``: send our current ad record (if we have an unexpired one) and close."""
    value = record()
    if value is not None:
        await channel.send(value)


class Finder:
    """A node's provider finder. ``own_ad()`` is our own ad and its expiry (None when we offer nothing)."""

    def __init__(
        self,
        host: net.NetHost,
        *,
        peer_id: str,
        clock_ms: Callable[[], int],
        skew_ms: int,
        own_ad: Callable[[], tuple[CapacityAd, int] | None],
    ) -> None:
        self.host = host
        self.peer_id = peer_id
        self.clock_ms = clock_ms
        self.skew_ms = skew_ms
        self.own_ad = own_ad
        self._find_cache: dict[FindQuery, tuple[float, list[str]]] = {}
        self._finding: dict[FindQuery, trio.Event] = {}  # finds in progress, which jobs wanting the same wait for
        self._ad_cache: dict[str, tuple[float, CapacityAd, int]] = {}  # peer -> (reuse until, ad, expires at ms)
        self.direct_timeout_s = AD_DIRECT_TIMEOUT_S

    async def find_peer_ids(self, req: dict[str, Any]) -> list[str]:
        """Providers for a job submission (the JobManager's finder), cached for FIND_CACHE_S.

        A find is over half of a trivial job's round trip (docs/benchmarks.md); the ads it returns stay valid until
        they expire, and a stale candidate costs only a failed quote, so jobs submitted together share one find.
        Jobs that miss the cache while a find for the same query runs wait for its answer instead of each finding
        (up to ``[jobs] max_active`` of them miss together whenever the cache expires).
        """
        query = FindQuery(cpus=req["cpus"], memory_bytes=req["memory_bytes"], gpus=req["gpus"],
                          gpu_model=req["gpu_model"], limit=50, runtime=req.get("runtime", ""),
                          runtime_sha256=bytes.fromhex(req.get("runtime_sha256", "")))  # fmt: skip
        cached = self._find_cache.get(query)
        if cached is not None and trio.current_time() - cached[0] < FIND_CACHE_S:
            return cached[1]
        while (running := self._finding.get(query)) is not None:
            # Another job is finding the same: share its answer rather than walk too. If it found nobody (not
            # cached), the first job woken finds again and the others wait for that one.
            await running.wait()
            cached = self._find_cache.get(query)
            if cached is not None:
                return cached[1]
        self._finding[query] = done = trio.Event()
        try:
            peers = [p["peer_id"] for p in await self.find(query)]
        finally:
            del self._finding[query]
            done.set()
        now = trio.current_time()
        self._find_cache = {q: v for q, v in self._find_cache.items() if now - v[0] < FIND_CACHE_S}
        if peers:  # an empty answer is not cached: the job is waiting for providers to appear
            self._find_cache[query] = (now, peers)
        return peers

    async def find(
        self, query: FindQuery, *, trace: net.LookupTrace | None = None, stages: FindStages | None = None
    ) -> list[dict[str, Any]]:
        """Providers whose signed, unexpired ads satisfy ``query`` (hints confirmed by fetching the ad).

        Given a ``trace``, the provider lookup's queries, rounds, hops and time are recorded in it; given
        ``stages``, the time of the hints and of the ads, and where the ads came from.
        """
        stages = stages if stages is not None else FindStages()
        started = time.perf_counter()
        resource_class = "gpu" if query.gpus or query.gpu_model else "cpu"
        candidates = await hints.find(self.host, resource_class, FIND_PROVIDERS_PER_CLASS, trace=trace)
        stages.hints_ms = (time.perf_counter() - started) * 1000
        logger.debug("find %s: provider hints %s", resource_class, candidates)
        now, now_ms = trio.current_time(), self.clock_ms()
        self._ad_cache = {p: c for p, c in self._ad_cache.items() if c[0] > now and c[2] > now_ms}
        found: dict[str, dict[str, Any]] = {}
        own = self.own_ad()
        if own is not None and ad_matches(own[0], query):
            found[self.peer_id] = ad_to_json(own[0], expires_at_ms=own[1])
        async with trio.open_nursery() as nursery:
            for peer_id in dict.fromkeys(candidates):
                if peer_id != self.peer_id:
                    nursery.start_soon(self._confirm, peer_id, query, found, stages)
        stages.ads_ms = (time.perf_counter() - started) * 1000 - stages.hints_ms
        ranked = sorted(found.values(), key=lambda p: (p["load_permille"], p["peer_id"]))
        return ranked[: query.limit]

    async def _confirm(
        self, peer_id: str, query: FindQuery, found: dict[str, dict[str, Any]], stages: FindStages
    ) -> None:
        cached = self._ad_cache.get(peer_id)
        if cached is not None and cached[0] > trio.current_time() and cached[2] > self.clock_ms():
            stages.ads_cached += 1
        else:
            cached = await self.fetch_ad(peer_id, stages)
        if cached is not None:
            _until, ad, expires_at_ms = cached
            if ad_matches(ad, query):
                found[peer_id] = ad_to_json(ad, expires_at_ms=expires_at_ms)

    async def fetch_ad(self, peer_id: str, stages: FindStages | None = None) -> tuple[float, CapacityAd, int] | None:
        """``peer_id``'s verified ad, cached; None if neither the peer nor the DHT has a valid one in time.

        The provider is asked first. When it has not answered within ``direct_timeout_s`` (or has failed), the
        DHT is asked too, and the first valid answer of the two wins: on a loaded machine a provider's answer can
        be late rather than missing, and a walk is no faster.
        """
        stages = stages if stages is not None else FindStages()
        key = cap_key(peer_id)
        found: list[tuple[VerifiedAd, str]] = []
        failure = ["timeout"]  # why the provider's own answer was not used
        asked_dht = trio.Event()

        async def direct(done: trio.CancelScope) -> None:
            value, why = await self._ask_provider(peer_id)
            verified = self._verify(key, value)
            if verified is not None:
                found.append((verified, "direct"))
                done.cancel()
            else:
                failure[0] = "invalid" if value is not None else why
                asked_dht.set()

        async def from_dht(done: trio.CancelScope) -> None:
            with trio.move_on_after(self.direct_timeout_s):
                await asked_dht.wait()
            try:
                verified = self._verify(key, await self.host.dht_get(key))
            except (ValueError, net.NetError) as exc:
                logger.debug("ad lookup of %s failed: %s", peer_id, exc)
                return
            if verified is not None:
                found.append((verified, "dht"))
                done.cancel()

        with trio.move_on_after(self.direct_timeout_s + FIND_LOOKUP_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(direct, nursery.cancel_scope)
                nursery.start_soon(from_dht, nursery.cancel_scope)
        if not found or found[0][1] != "direct":
            stages.direct_failed[failure[0]] = stages.direct_failed.get(failure[0], 0) + 1
        if not found:
            stages.ads_missing += 1
            return None
        verified, source = found[0]
        if source == "direct":
            stages.ads_direct += 1
        else:
            stages.ads_dht += 1
        self.host.learn_circuits(peer_id, verified.ad.addrs)  # relayed addresses, for when a direct dial fails
        entry = (trio.current_time() + AD_CACHE_S, verified.ad, verified.envelope.expires_at)
        self._ad_cache[peer_id] = entry
        return entry

    async def _ask_provider(self, peer_id: str) -> tuple[bytes | None, str]:
        """The record ``peer_id`` sends on ``/coop/ad/1.0.0``, or None and why not (``dial``, ``no-ad``)."""
        try:
            stream = await self.host.open_stream(peer_id, AD_PROTOCOL_ID)
        except net.NetError as exc:
            logger.debug("could not ask %s for its ad: %s", peer_id, exc)
            return None, "dial"
        async with stream:  # closed after the frame; reset (shielded) if we time out or fail
            try:
                return await net.receive_frame(stream, AD_RECORD_MAX_BYTES), ""
            except net.NetError as exc:
                logger.debug("%s sent no ad: %s", peer_id, exc)
                return None, "no-ad"

    def _verify(self, key: str, value: bytes | None) -> VerifiedAd | None:
        if value is None:
            return None
        try:
            return validate_ad_record(key, value, now=self.clock_ms(), max_skew_ms=self.skew_ms)
        except RemoteProtocolError as exc:
            logger.debug("ad under %s refused: %s", key, exc)
            return None
