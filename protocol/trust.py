"""Trust, pure: how far this node trusts each peer, from the verified reputation records it holds.

Theory of operation
-------------------
The input is :class:`Evidence`: one verified :class:`~protocol.messages.ReputationRecord`, already bound by the
caller to its two-party receipt, plus the cost that receipt paid. Unsigned or unbound records never get here.
The output is a :class:`TrustTable` of scores in [0, 1] (0.5 is "no idea", the market's neutral trust), each with
its reasons in words. Everything is relative to one node, ``me``: there is no global reputation.

Rules:

1. **Weight.** A record weighs ``0.5 ** (age / half_life) * log1p(cost / cost_unit)``. For cheap jobs the log is
   about ``cost / cost_unit``, so any number of jobs weighs at most what they paid in total (a thousand
   1-milli-credit jobs weigh what one 1-credit job does), and it is concave for dear ones, so one huge job cannot
   buy unbounded weight. A free job weighs nothing. A rater counts once per receipt: its latest record wins.
   Cost alone does not stop a ring (its members can pay one another); rule 4 does, and cost limits how much
   trust a cheap job with someone ``me`` trusts lets in.
2. **Satisfaction.** Each record has a value: success ``score / 100``; provider-failure and timeout ``-1``;
   bad-result ``-bad_result_penalty`` (a wrong answer is worse than none); client-failure
   ``min(0, (score - 50) / 50)``: records do not say who was the client, so it only counts when the rater marked
   the ratee down. Rater i's opinion of j is ``s_ij = sum(weight * value)`` over its records about j.
3. **Direct experience** is ``me``'s records: ``pos`` and ``neg``, the weighted positive and negative values.
4. **Transitive trust** is EigenTrust personalised to ``me``. ``C[i][j] = max(0, s_ij) / sum_k max(0, s_ik)``
   (only positive opinions, normalised per rater). The pre-trusted set P is the peers ``me`` holds a positive
   opinion of, and the restart vector is ``p = C[me]``. ``t = a*p + (1-a)*t*C`` is summed as the series
   ``a * p * sum_n ((1-a) * C) ** n``, pushed outwards from P until a step moves less than ``tolerance``, so
   it costs O(iterations x edges reached). Mass that reaches ``me`` follows ``me``'s own opinions again.
   Trust reaches j only along a chain of positive opinions from P: a ring of fresh identities praising each
   other gets exactly 0, however many records it writes. ``transitive = min(1, t_j * |P| / a)``: 1 means as much
   as the average member of P gets from ``me``'s restarts alone. Until ``me`` has one good job, P is empty and
   nobody has transitive trust.
5. **Score** ``= (k*prior + T*transitive + pos) / (k + T*transitive + pos + neg)``: a Beta estimate where the
   prior is worth ``k`` (``confidence``) and transitive trust at most ``T`` (``transitive_weight``) of
   pseudo-positive weight. With no direct records it lies in [prior, (k*prior + T) / (k + T)]; as direct weight
   grows it tends to ``pos / (pos + neg)``, so direct experience dominates.
6. **Bad results.** A bad result seen by ``me`` within ``bad_result_window`` caps the score at
   ``bad_result_cap`` (< 0.5, so a client re-checks that provider's results) whatever anyone else says.

Invariants (tested): scores lie in [0, 1]; a new good direct record about X never lowers X's score; older
evidence weighs less; records whose raters have no trust path from P change no score at all, and a peer with
neither direct evidence nor a trust path scores exactly the prior.

Deviations from EigenTrust (Kamvar et al., 2003): personalised (P is ``me``'s positive experience, not a global
pre-trusted set); weighted by cost and age instead of counting transactions; a rater with no positive opinion
drops its mass instead of restarting it (this keeps ``t`` linear in ``p``, hence monotone); and third parties'
complaints are not used, only their praise (EigenTrust's ``max(0, .)``), which ignores bad-mouthing by design.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, final

from protocol.errors import LocalProtocolError
from protocol.messages import Outcome, ReputationRecord

DAY_MS: Final = 86_400_000


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class TrustParams:
    """Tuning of :func:`compute_trust`. Defaults and why:

    Attributes:
        half_life_ms: age at which a record weighs half (30 days: a month-old job still counts, a year-old barely).
        cost_unit: milli-credits at which a job's weight is ``log 2`` (1 credit, about 100 CPU-seconds at the
            default price of 10 per CPU-second); far cheaper jobs weigh about ``cost / cost_unit``.
        alpha: restart probability of the walk (0.15, the PageRank/EigenTrust classic: trust fades by 0.85 a hop).
        max_iterations: hard stop of the walk (200 steps: ``0.85 ** 200`` is below 1e-14).
        tolerance: stop once a step moves less trust than this in all (1e-12).
        prior: the score of a peer nobody trusted has evidence about (0.5, neutral, as the market assumes).
        confidence: pseudo-weight of the prior (2.0, about one 6-credit job, so a few real jobs outweigh it).
        transitive_weight: pseudo-weight of full transitive trust (1.0: hearsay is worth less than the prior, so
            peers vouched for but never tried stay within [0.5, 0.67] and direct experience dominates).
        bad_result_penalty: how many failures one bad result counts as (3.0).
        bad_result_cap: the most a peer scores after a recent bad result (0.3: below the 0.5 verify threshold).
        bad_result_window_ms: how long a bad result caps the score (30 days); afterwards it only weighs in.
    """

    half_life_ms: int = 30 * DAY_MS
    cost_unit: int = 1000
    alpha: float = 0.15
    max_iterations: int = 200
    tolerance: float = 1e-12
    prior: float = 0.5
    confidence: float = 2.0
    transitive_weight: float = 1.0
    bad_result_penalty: float = 3.0
    bad_result_cap: float = 0.3
    bad_result_window_ms: int = 30 * DAY_MS

    def __post_init__(self) -> None:
        ok = (
            self.half_life_ms > 0
            and self.cost_unit > 0
            and 0 < self.alpha < 1
            and self.max_iterations >= 1
            and self.tolerance >= 0
            and 0 <= self.prior <= 1
            and self.confidence > 0
            and self.transitive_weight >= 0
            and self.bad_result_penalty >= 0
            and 0 <= self.bad_result_cap <= 1
            and self.bad_result_window_ms >= 0
        )
        if not ok:
            raise LocalProtocolError(f"invalid trust parameters: {self}")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """One verified reputation record, bound to a receipt that paid ``cost`` milli-credits."""

    rater: str
    ratee: str
    outcome: Outcome
    score: int  # 0 (worst) .. 100 (best)
    time: int  # Unix ms
    cost: int  # milli-credits
    receipt_hash: bytes

    def __post_init__(self) -> None:
        if self.rater == self.ratee:
            raise LocalProtocolError("a peer cannot rate itself")
        if not (0 <= self.score <= 100 and self.time >= 0 and self.cost >= 0):
            raise LocalProtocolError("evidence score must be 0..100, time and cost non-negative")

    @classmethod
    def from_record(cls, record: ReputationRecord, *, cost: int) -> Evidence:
        """Evidence from a record the caller has verified and bound to a receipt that cost ``cost``."""
        return cls(
            rater=record.rater,
            ratee=record.ratee,
            outcome=record.outcome,
            score=record.score,
            time=record.time,
            cost=cost,
            receipt_hash=record.receipt_hash,
        )


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class TrustScore:
    """How far ``me`` trusts ``peer`` and why.

    Attributes:
        score: the final score in [0, 1].
        direct: the score from ``me``'s own records alone (prior-smoothed), or None without any.
        transitive: trust reaching the peer through the personalised walk, in [0, 1].
        evidence_count: records about the peer, from anyone.
        explanation: how the score was computed, in words.
        direct_weight: total weight (decayed, cost-scaled; a bad result counts ``bad_result_penalty`` times) of
            ``me``'s records about the peer: how much the direct part is worth against the prior.
    """

    peer: str
    score: float
    direct: float | None
    transitive: float
    evidence_count: int
    explanation: str
    direct_weight: float = 0.0


@final
@dataclass(frozen=True, slots=True)
class TrustTable:
    """The result of :func:`compute_trust`: a score for every peer in the evidence (``me`` is not scored)."""

    prior: float
    scores: Mapping[str, TrustScore]

    def score(self, peer: str) -> float:
        """The peer's score; the prior for a peer without evidence."""
        found = self.scores.get(peer)
        return self.prior if found is None else found.score

    def explain(self, peer: str) -> TrustScore:
        """The peer's score with its reasons."""
        found = self.scores.get(peer)
        if found is None:
            return TrustScore(
                peer=peer,
                score=self.prior,
                direct=None,
                transitive=0.0,
                evidence_count=0,
                explanation=f"no evidence: prior {self.prior:.2f}",
            )
        return found

    def ranked(self) -> list[TrustScore]:
        """Every scored peer, best first (ties by peer id)."""
        return sorted(self.scores.values(), key=lambda s: (-s.score, s.peer))


def record_weight(evidence: Evidence, *, now: int, params: TrustParams = TrustParams()) -> float:
    """A record's weight: age decay times cost scaling (rule 1). Future-dated records count as new."""
    decay = math.exp2(-max(0, now - evidence.time) / params.half_life_ms)
    return decay * math.log1p(evidence.cost / params.cost_unit)


def satisfaction(evidence: Evidence, params: TrustParams = TrustParams()) -> float:
    """A record's value before weighting (rule 2)."""
    match evidence.outcome:
        case Outcome.SUCCESS:
            return evidence.score / 100
        case Outcome.BAD_RESULT:
            return -params.bad_result_penalty
        case Outcome.CLIENT_FAILURE:
            return min(0.0, (evidence.score - 50) / 50)
        case _:  # provider-failure, timeout
            return -1.0


@dataclass(slots=True)
class _Direct:
    pos: float = 0.0
    neg: float = 0.0
    tally: dict[str, int] = field(default_factory=dict)
    last_bad: int | None = None


_KINDS: Final = ("good job", "failed job", "bad result", "client failure")
_KIND: Final = {
    Outcome.SUCCESS: "good job",
    Outcome.PROVIDER_FAILURE: "failed job",
    Outcome.TIMEOUT: "failed job",
    Outcome.BAD_RESULT: "bad result",
    Outcome.CLIENT_FAILURE: "client failure",
}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _normalised(opinions: Mapping[str, float]) -> dict[str, float]:
    total = sum(s for s in opinions.values() if s > 0)
    return {j: s / total for j, s in opinions.items() if s > 0} if total > 0 else {}


def _walk(rows: Mapping[str, Mapping[str, float]], p: Mapping[str, float], params: TrustParams) -> dict[str, float]:
    """``a * p * sum_n ((1-a) C) ** n``, pushed from the restart set (rule 4); peers not reached are absent."""
    a = params.alpha
    frontier = {j: a * pj for j, pj in p.items()}
    t = dict(frontier)
    for _ in range(params.max_iterations):
        step: dict[str, float] = {}
        for i, mass in frontier.items():
            passed = (1 - a) * mass
            for j, c in rows.get(i, {}).items():
                step[j] = step.get(j, 0.0) + passed * c
        for j, m in step.items():
            t[j] = t.get(j, 0.0) + m
        frontier = step
        if sum(step.values()) <= params.tolerance:
            break
    return t


def compute_trust(
    evidence: Iterable[Evidence], *, me: str, now: int, params: TrustParams = TrustParams()
) -> TrustTable:
    """Score every peer in ``evidence`` from ``me``'s point of view at time ``now`` (Unix ms).

    Args:
        evidence: verified, receipt-bound records (any order; duplicates per rater and receipt are merged).
        me: this node's peer id.
        now: the current time, Unix ms.
        params: tuning; see :class:`TrustParams`.

    Returns:
        The table of scores, with explanations.
    """
    latest: dict[tuple[str, bytes], Evidence] = {}
    for e in evidence:
        old = latest.get((e.rater, e.receipt_hash))
        if old is None or (e.time, -e.score) > (old.time, -old.score):
            latest[(e.rater, e.receipt_hash)] = e

    opinions: dict[str, dict[str, float]] = {}  # rater -> ratee -> s_ij
    raters_of: dict[str, dict[str, int]] = {}  # ratee -> rater -> records
    direct: dict[str, _Direct] = {}
    for e in latest.values():
        value = record_weight(e, now=now, params=params) * satisfaction(e, params)
        row = opinions.setdefault(e.rater, {})
        row[e.ratee] = row.get(e.ratee, 0.0) + value
        counts = raters_of.setdefault(e.ratee, {})
        counts[e.rater] = counts.get(e.rater, 0) + 1
        if e.rater == me:
            d = direct.setdefault(e.ratee, _Direct())
            d.pos, d.neg = d.pos + max(0.0, value), d.neg + max(0.0, -value)
            d.tally[_KIND[e.outcome]] = d.tally.get(_KIND[e.outcome], 0) + 1
            if e.outcome is Outcome.BAD_RESULT and (d.last_bad is None or e.time > d.last_bad):
                d.last_bad = e.time

    rows = {i: _normalised(row) for i, row in opinions.items()}
    p = rows.get(me, {})
    t = _walk(rows, p, params)
    trusted = {i for i, ti in t.items() if ti > 0 and i != me}
    scale = len(p) / params.alpha

    peers = (set(opinions) | set(raters_of)) - {me}
    k, prior, cap = params.confidence, params.prior, params.bad_result_cap
    scores: dict[str, TrustScore] = {}
    for peer in sorted(peers):
        raters = raters_of.get(peer, {})
        via = sum(1 for i in raters if i in trusted and rows[i].get(peer, 0.0) > 0)
        ignored = sum(n for i, n in raters.items() if i != me and i not in trusted)
        transitive = min(1.0, t.get(peer, 0.0) * scale)
        d = direct.get(peer, _Direct())
        lift = params.transitive_weight * transitive
        score = min(1.0, max(0.0, (k * prior + lift + d.pos) / (k + lift + d.pos + d.neg)))
        own = " and your own rating" if peer in p else ""
        parts = [f"transitive {transitive:.2f} via {_plural(via, 'trusted rater')}{own}"]
        if d.tally:
            kinds = ", ".join(_plural(d.tally[kind], kind) for kind in _KINDS if kind in d.tally)
            parts.insert(0, f"direct: {kinds} (weight {d.pos + d.neg:.2f})")
        else:
            parts.insert(0, "no direct experience")
        if ignored:
            parts.append(f"{_plural(ignored, 'record')} from raters without a trust path ignored")
        if d.last_bad is not None and now - d.last_bad < params.bad_result_window_ms:
            score = min(score, cap)
            parts.append(f"capped at {cap:.2f} by a bad result {max(0, now - d.last_bad) // DAY_MS} days ago")
        scores[peer] = TrustScore(
            peer=peer,
            score=score,
            direct=(k * prior + d.pos) / (k + d.pos + d.neg) if d.tally else None,
            transitive=transitive,
            evidence_count=sum(raters.values()),
            explanation=f"score {score:.2f}: " + "; ".join(parts),
            direct_weight=d.pos + d.neg,
        )
    return TrustTable(prior=prior, scores=MappingProxyType(scores))
