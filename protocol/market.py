"""Market policy, pure: what a provider quotes, whom a client picks, and why nobody took a job.

Provider side: :class:`MarketPolicy` is a snapshot of the provider's situation (floor prices, utilisation,
capacity, free job slots, blocked peers) that answers a QuoteRequest with a price sheet or a
:class:`~protocol.pricing.Decline` carrying the reason. Prices rise with utilisation: at load ``u`` (0..1) the
floor is multiplied by ``1 + surge * u**2`` (flat while idle, steep when nearly full), so a busy provider
prices itself out before it refuses outright.

Client side: :func:`rank_offers` orders acceptable quotes by worst-case cost, adjusted by the provider's trust
(0.5 is neutral) and the measured round-trip latency; :func:`explain_failures` turns every candidate's refusal
into one sentence ("3 providers: 2 busy, 1 below floor price (your max price is 500)").
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Final, final

from protocol.messages import Counter, PriceSheet, Quote, QuoteRequest, RejectCode, Resources, Runtime
from protocol.pricing import Decline, midpoint, sheet_at_least, worst_case_cost

SURGE_PERMILLE: Final = 1000  # at full load prices are double the floor
NEUTRAL_TRUST: Final = 0.5


def surge_sheet(floor: PriceSheet, load_permille: int, *, surge_permille: int = SURGE_PERMILLE) -> PriceSheet:
    """The floor raised for the current utilisation (load clamped to 0..1000 per-mille)."""
    load = max(0, min(1000, load_permille))
    factor_num = 1_000_000_000 + surge_permille * load * load  # 1e9 * (1 + s*u^2), s and u in per-mille
    den = 1_000_000_000

    def up(price: int) -> int:
        return -(-price * factor_num // den)

    return PriceSheet(
        start_fee=up(floor.start_fee),
        per_cpu_second=up(floor.per_cpu_second),
        per_gib_second=up(floor.per_gib_second),
        per_gpu_second=up(floor.per_gpu_second),
    )


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class MarketPolicy:
    """A provider's quoting policy for one moment. Build a fresh one per request from current state."""

    floor: PriceSheet
    load_permille: int = 0
    cpus: int = 1
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpu_models: tuple[str, ...] = ()
    free_slots: int = 1
    blocked: frozenset[str] = field(default_factory=frozenset)
    surge_permille: int = SURGE_PERMILLE
    runtimes: tuple[Runtime, ...] = ()

    @property
    def list_price(self) -> PriceSheet:
        return surge_sheet(self.floor, self.load_permille, surge_permille=self.surge_permille)

    def admit(self, request: QuoteRequest) -> Decline | None:
        """Why this provider cannot take the job at any price, or None."""
        if request.client in self.blocked:
            return Decline(RejectCode.BLOCKED_PEER, "this provider does not trade with you")
        res = request.resources
        if res.cpus > self.cpus or res.memory_bytes > self.memory_bytes or res.disk_bytes > self.disk_bytes:
            return Decline(RejectCode.INSUFFICIENT_RESOURCES, "the job needs more CPU, memory or disk than offered")
        models = [m for m in self.gpu_models if res.gpu_model.lower() in m.lower()]
        if res.gpus > len(models):
            return Decline(RejectCode.INSUFFICIENT_RESOURCES, f"the job needs {res.gpus} matching GPU(s)")
        missing = runtime_mismatch(self.runtimes, res)
        if missing:
            return Decline(RejectCode.NO_RUNTIME, missing)
        if self.free_slots <= 0:
            return Decline(RejectCode.BUSY, "all job slots are in use")
        return None

    def quote(self, request: QuoteRequest, *, now: int) -> PriceSheet | Decline:
        refusal = self.admit(request)
        if refusal is not None:
            return refusal
        if worst_case_cost(request.resources, request.limits, self.floor) > request.max_price:
            return Decline(RejectCode.BELOW_FLOOR, "your max price is below this provider's floor for the job")
        return self.list_price

    def counter(self, request: QuoteRequest, last: Quote, counter: Counter, *, now: int) -> PriceSheet | Decline:
        """Take any counter at or above the floor; otherwise meet half way while that stays above the floor."""
        if sheet_at_least(counter.price_sheet, self.floor):
            return counter.price_sheet
        middle = midpoint(counter.price_sheet, last.price_sheet)
        if not sheet_at_least(middle, self.floor) or middle == last.price_sheet:
            return Decline(RejectCode.BELOW_FLOOR, "the counter-offer is below this provider's floor")
        return middle


def runtime_mismatch(runtimes: tuple[Runtime, ...], resources: Resources) -> str:
    """Why ``runtimes`` (a provider's) cannot serve a job needing ``resources``; empty when they can.

    A job that names no runtime needs none. A pinned lock hash must match exactly.
    """
    if not resources.runtime:
        return ""
    found = next((r for r in runtimes if r.name == resources.runtime), None)
    if found is None:
        return f"this provider has no runtime {resources.runtime!r}"
    if resources.runtime_sha256 and resources.runtime_sha256 != found.lock_sha256:
        return f"this provider's runtime {resources.runtime!r} has a different lock hash"
    return ""


@final
@dataclass(frozen=True, slots=True)
class Offer:
    """An acceptable quote as the client sees it."""

    provider: str
    cost: int  # worst-case cost under the quoted sheet, milli-credits
    trust: float = NEUTRAL_TRUST  # 0..1
    latency_ms: float = 0.0

    @property
    def score(self) -> float:
        """Lower is better: cost, discounted for trust (x0.5 at trust 1, x1.5 at trust 0), +1% per 10 ms RTT."""
        return self.cost * (1.5 - max(0.0, min(1.0, self.trust))) * (1 + self.latency_ms / 1000)


def rank_offers(offers: list[Offer]) -> list[Offer]:
    """Best first; ties broken by cost, then provider id (deterministic)."""
    return sorted(offers, key=lambda o: (o.score, o.cost, o.provider))


_REASON_TEXT: Final = {
    RejectCode.BUSY: "busy",
    RejectCode.INSUFFICIENT_RESOURCES: "without enough resources",
    RejectCode.BELOW_FLOOR: "priced above your max price",
    RejectCode.ABOVE_MAX_PRICE: "priced above your max price",
    RejectCode.BLOCKED_PEER: "refusing to trade with you",
    RejectCode.TIMEOUT: "not answering",
    RejectCode.QUOTE_EXPIRED: "with an expired quote",
    RejectCode.PREEMPTED: "preempted by their owner",
    RejectCode.NO_RUNTIME: "without the runtime",
}


def explain_failures(reasons: list[RejectCode], *, max_price: int, candidates: int | None = None) -> str:
    """One sentence saying why no provider took a job."""
    if not reasons:
        return "no provider with a valid capacity ad fits the job's resources"
    tally = Tally(_REASON_TEXT.get(code, code.value) for code in reasons)
    parts = [f"{n} {text}" for text, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))]
    total = candidates if candidates is not None else len(reasons)
    noun = "provider" if total == 1 else "providers"
    return f"{total} {noun}: {', '.join(parts)} (your max price is {max_price} milli-credits)"


def resource_class(request: QuoteRequest) -> str:
    """The market segment a request belongs to, for price statistics (``cpu`` or ``gpu``)."""
    return "gpu" if request.resources.gpus else "cpu"


NEGOTIATE_PROTOCOL_ID: Final = "/coop/negotiate/1.0.0"
JOB_PROTOCOL_ID: Final = "/coop/job/1.0.0"
RECEIPT_PROTOCOL_ID: Final = "/coop/receipt/1.0.0"
