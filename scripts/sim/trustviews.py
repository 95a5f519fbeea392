"""How a simulated client scores providers: the project's trust, textbook EigenTrust, or none.

* :class:`CoopTrust` calls ``protocol.trust.compute_trust`` (looked up at call time, so a test can replace it)
  for each client over the records it can see. What it sees is modelled: its own records, then breadth first the
  records of the peers it rated well, of the peers they rated well, and so on, up to ``max_raters`` raters. The
  personalised walk only ever moves trust along positive opinions from the client's own, so the records left out
  are those of raters far from it (each hop carries 0.85 of the trust); scores of peers reached only through them
  fall back towards the prior. A client recomputes after each record of its own and at least every
  ``refresh_ms``; the daemon recomputes on every record it stores.
* :class:`EigenTrust` is the textbook global EigenTrust (Kamvar, Schlosser, Garcia-Molina 2003): local trust
  ``s_ij = sat - unsat`` (counts, no cost, no decay), ``c_ij = max(s_ij, 0) / sum``, a fixed pre-trusted set
  with ``p`` uniform over it, ``t = (1 - a) C^T t + a p``, one vector for everyone, refreshed every
  ``refresh_ms``. To plug it into the same market, a peer's score is ``min(1, t_j * n)`` (1 = the average of the
  ``n`` peers with records), and a peer nobody has rated gets the same 0.5 prior as in :class:`CoopTrust`.
* :class:`NoTrust`: reputation off; every provider scores the neutral 0.5 and the market picks at random.
"""

from __future__ import annotations

from collections import deque

from protocol import trust as trust_module
from protocol.messages import Outcome
from protocol.trust import Evidence, TrustParams, TrustTable


class RecordIndex:
    """Every record in the simulated network, by rater (gossip and pull sync are modelled as complete)."""

    def __init__(self) -> None:
        self.by_rater: dict[str, list[Evidence]] = {}
        self.liked: dict[str, dict[str, None]] = {}  # rater -> ratees it rated well, in order of first praise
        self.count = 0

    def add(self, evidence: Evidence) -> None:
        self.by_rater.setdefault(evidence.rater, []).append(evidence)
        if evidence.outcome is Outcome.SUCCESS and evidence.score >= 50:
            self.liked.setdefault(evidence.rater, {})[evidence.ratee] = None
        self.count += 1


class CoopTrust:
    name = "coop"

    def __init__(self, index: RecordIndex, *, params: TrustParams, max_raters: int, refresh_ms: int) -> None:
        self.index = index
        self.params = params
        self.max_raters = max_raters
        self.refresh_ms = refresh_ms
        self._cache: dict[str, tuple[int, int, TrustTable]] = {}
        self.computations = 0
        self.evidence_seen = 0

    def evidence_for(self, me: str) -> list[Evidence]:
        """The records ``me``'s trust computation sees (see the module docstring)."""
        raters = [me]
        seen = {me}
        queue = deque([me])
        while queue and len(raters) < self.max_raters:
            for ratee in self.index.liked.get(queue.popleft(), {}):
                if ratee not in seen:
                    seen.add(ratee)
                    raters.append(ratee)
                    queue.append(ratee)
                    if len(raters) >= self.max_raters:
                        break
        by_rater = self.index.by_rater
        return [e for rater in raters for e in by_rater.get(rater, ())]

    def table(self, me: str, now: int) -> TrustTable:
        own = len(self.index.by_rater.get(me, ()))
        hit = self._cache.get(me)
        if hit is not None and hit[0] == own and now - hit[1] < self.refresh_ms:
            return hit[2]
        evidence = self.evidence_for(me)
        self.computations += 1
        self.evidence_seen += len(evidence)
        table = trust_module.compute_trust(evidence, me=me, now=now, params=self.params)
        self._cache[me] = (own, now, table)
        return table

    def score(self, me: str, peer: str, now: int) -> float:
        return self.table(me, now).score(peer)


class EigenTrust:
    name = "eigentrust"

    def __init__(
        self, index: RecordIndex, *, pretrusted: list[str], refresh_ms: int, alpha: float = 0.15, iterations: int = 30
    ) -> None:
        if not pretrusted:
            raise ValueError("EigenTrust needs a pre-trusted set")
        self.index = index
        self.pretrusted = pretrusted
        self.refresh_ms = refresh_ms
        self.alpha = alpha
        self.iterations = iterations
        self._computed_at: int | None = None
        self._scores: dict[str, float] = {}
        self.computations = 0

    def _compute(self) -> None:
        local: dict[str, dict[str, int]] = {}
        peers: set[str] = set()
        for rater, records in self.index.by_rater.items():
            row = local.setdefault(rater, {})
            for e in records:
                good = e.outcome is Outcome.SUCCESS and e.score >= 50
                row[e.ratee] = row.get(e.ratee, 0) + (1 if good else -1)
                peers.add(e.ratee)
            peers.add(rater)
        rows: dict[str, list[tuple[str, float]]] = {}
        for i, row in local.items():
            total = sum(s for s in row.values() if s > 0)
            if total > 0:
                rows[i] = [(j, s / total) for j, s in sorted(row.items()) if s > 0]
        p = {j: 1 / len(self.pretrusted) for j in self.pretrusted}
        t = dict(p)
        a = self.alpha
        for _ in range(self.iterations):
            nxt = {j: a * pj for j, pj in p.items()}
            for i, ti in t.items():
                row_i = rows.get(i)
                if row_i is None:  # no positive opinions: its mass goes to the pre-trusted peers (textbook)
                    for j, pj in p.items():
                        nxt[j] += (1 - a) * ti * pj
                    continue
                for j, c in row_i:
                    nxt[j] = nxt.get(j, 0.0) + (1 - a) * ti * c
            delta = sum(abs(nxt.get(j, 0.0) - t.get(j, 0.0)) for j in set(nxt) | set(t))
            t = nxt
            if delta < 1e-9:
                break
        n = max(1, len(peers))
        self._scores = {j: min(1.0, t.get(j, 0.0) * n) for j in peers}
        self.computations += 1

    def score(self, me: str, peer: str, now: int) -> float:
        if self._computed_at is None or now - self._computed_at >= self.refresh_ms:
            self._compute()
            self._computed_at = now
        return self._scores.get(peer, 0.5)


class NoTrust:
    name = "off"
    computations = 0

    def score(self, me: str, peer: str, now: int) -> float:
        return 0.5
