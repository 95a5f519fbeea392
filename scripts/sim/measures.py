"""What a run measures, per simulated day, and the printed report.

All values come from simulated events only (no wall clock), so the same seed gives the same numbers.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scripts.sim.population import ADVERSARIES, DAY_MS, EPOCH_MS


def _day(now: int) -> int:
    return (now - EPOCH_MS) // DAY_MS


@dataclass
class Day:
    submitted: int = 0
    completed: int = 0
    on_time: int = 0
    failed: int = 0
    assigned: Counter[str] = field(default_factory=Counter)  # primary runs by provider role
    accepted_wrong: Counter[str] = field(default_factory=Counter)  # wrong results accepted, by attack
    caught: Counter[str] = field(default_factory=Counter)  # providers outvoted, by role
    work_primary: float = 0.0  # CPU-seconds
    work_replica: float = 0.0
    used_cpus: list[float] = field(default_factory=list)  # hourly samples of used / offered CPUs
    used_gpus: list[float] = field(default_factory=list)
    price_index: dict[str, list[float]] = field(default_factory=lambda: {"cpu": [], "gpu": []})
    dispersion: dict[str, list[float]] = field(default_factory=lambda: {"cpu": [], "gpu": []})
    queue_s: list[float] = field(default_factory=list)


class Measures:
    def __init__(self, days: int) -> None:
        self.days = [Day() for _ in range(days + 1)]
        self.failures: Counter[str] = Counter()
        self.by_role_submitted: Counter[str] = Counter()
        self.by_role_completed: Counter[str] = Counter()
        self.spent: Counter[str] = Counter()  # milli-credits paid, by client role
        self.earned: Counter[str] = Counter()  # milli-credits earned, by provider role
        self.disputed = 0
        self.unverified = 0
        self.rejoins = 0

    def day(self, now: int) -> Day:
        return self.days[min(len(self.days) - 1, max(0, _day(now)))]

    def summary(self) -> dict[str, Any]:
        """The run's numbers as plain data (what the determinism test compares)."""
        days = self.days[:-1] if self.days[-1].submitted == 0 else self.days
        total = Day()
        for d in days:
            total.submitted += d.submitted
            total.completed += d.completed
            total.on_time += d.on_time
            total.failed += d.failed
            total.assigned.update(d.assigned)
            total.accepted_wrong.update(d.accepted_wrong)
            total.caught.update(d.caught)
            total.work_primary += d.work_primary
            total.work_replica += d.work_replica
            total.queue_s += d.queue_s

        def ratio(a: float, b: float) -> float:
            return round(a / b, 6) if b else 0.0

        def per_day(fn: Any) -> list[float]:
            return [round(fn(d), 6) for d in days]

        assigned_total = sum(total.assigned.values())
        return {
            "jobs": {
                "submitted": total.submitted,
                "completed": total.completed,
                "completed_by_deadline": ratio(total.on_time, total.submitted),
                "failed": total.failed,
                "disputed": self.disputed,
                "unverified_no_replica": self.unverified,
                "queue_delay_s_median": round(statistics.median(total.queue_s), 3) if total.queue_s else 0.0,
                "queue_delay_s_p90": round(_quantile(total.queue_s, 0.9), 3),
            },
            "utilisation_cpu": round(statistics.fmean(x for d in days for x in d.used_cpus), 6),
            "utilisation_gpu": round(statistics.fmean(x for d in days for x in d.used_gpus), 6),
            "dishonest_share": {a: ratio(total.assigned[a], assigned_total) for a in ADVERSARIES},
            "wrong_accepted": {a: ratio(total.accepted_wrong[a], total.completed) for a in ADVERSARIES},
            "wrong_accepted_total": ratio(sum(total.accepted_wrong.values()), total.completed),
            "caught": dict(sorted(total.caught.items())),
            "replicated_work_share": ratio(total.work_replica, total.work_primary + total.work_replica),
            "free_riders": {
                "completion": ratio(self.by_role_completed["free-rider"], self.by_role_submitted["free-rider"]),
                "honest_completion": ratio(self.by_role_completed["honest"], self.by_role_submitted["honest"]),
                "spent_credits": self.spent["free-rider"] // 1000,
                "earned_credits": self.earned["free-rider"] // 1000,
            },
            "rejoins": self.rejoins,
            "top_failures": [[text, n] for text, n in self.failures.most_common(3)],
            "per_day": {
                "completed_by_deadline": per_day(lambda d: ratio(d.on_time, d.submitted)),
                "utilisation_cpu": per_day(lambda d: statistics.fmean(d.used_cpus) if d.used_cpus else 0.0),
                "utilisation_gpu": per_day(lambda d: statistics.fmean(d.used_gpus) if d.used_gpus else 0.0),
                "replicated_work_share": per_day(lambda d: ratio(d.work_replica, d.work_primary + d.work_replica)),
                "wrong_accepted": {
                    a: per_day(lambda d, a=a: ratio(d.accepted_wrong[a], d.completed)) for a in ADVERSARIES
                },
                "dishonest_share": {
                    a: per_day(lambda d, a=a: ratio(d.assigned[a], sum(d.assigned.values()))) for a in ADVERSARIES
                },
                "price_index_median": {
                    c: per_day(lambda d, c=c: statistics.median(d.price_index[c]) if d.price_index[c] else 0.0)
                    for c in ("cpu", "gpu")
                },
                "price_dispersion": {
                    c: per_day(lambda d, c=c: statistics.fmean(d.dispersion[c]) if d.dispersion[c] else 0.0)
                    for c in ("cpu", "gpu")
                },
            },
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: dict[str, dict[str, Any]]) -> str:
    """The measures of every mode, side by side, as text."""
    modes = list(results)
    lines = []

    def row(label: str, fn: Any, fmt: str = "{:>12.3f}") -> None:
        lines.append(f"{label:<40}" + "".join(fmt.format(fn(results[m])) for m in modes))

    lines.append(f"{'measure':<40}" + "".join(f"{m:>12}" for m in modes))
    row("jobs submitted", lambda r: r["jobs"]["submitted"], "{:>12d}")
    row("completed by deadline (share)", lambda r: r["jobs"]["completed_by_deadline"])
    row("failed", lambda r: r["jobs"]["failed"], "{:>12d}")
    row("queueing delay median (s)", lambda r: r["jobs"]["queue_delay_s_median"], "{:>12.1f}")
    row("queueing delay p90 (s)", lambda r: r["jobs"]["queue_delay_s_p90"], "{:>12.1f}")
    row("utilisation of offered CPUs", lambda r: r["utilisation_cpu"])
    row("utilisation of offered GPUs", lambda r: r["utilisation_gpu"])
    for attack in ADVERSARIES:
        row(f"jobs given to {attack}", lambda r, a=attack: r["dishonest_share"][a])
    for attack in ADVERSARIES:
        row(f"wrong results accepted: {attack}", lambda r, a=attack: r["wrong_accepted"][a], "{:>12.4f}")
    row("wrong results accepted: all", lambda r: r["wrong_accepted_total"], "{:>12.4f}")
    row("replicated work / all work", lambda r: r["replicated_work_share"])
    row("disputed (no majority)", lambda r: r["jobs"]["disputed"], "{:>12d}")
    row("free riders' jobs completed", lambda r: r["free_riders"]["completion"])
    row("honest clients' jobs completed", lambda r: r["free_riders"]["honest_completion"])
    row("whitewasher rejoins", lambda r: r["rejoins"], "{:>12d}")
    lines.append("")
    for m in modes:
        pd = results[m]["per_day"]
        lines.append(f"[{m}] per day: wrong accepted (all attacks) / replicated share / CPU use / CPU price index")
        wrong = [sum(pd["wrong_accepted"][a][i] for a in ADVERSARIES) for i in range(len(pd["utilisation_cpu"]))]
        for i, w in enumerate(wrong):
            lines.append(
                f"  day {i}: {w:.4f} / {pd['replicated_work_share'][i]:.3f} / {pd['utilisation_cpu'][i]:.3f} / "
                f"{pd['price_index_median']['cpu'][i]:.3f} (dispersion {pd['price_dispersion']['cpu'][i]:.3f})"
            )
        for text, n in results[m]["top_failures"]:
            lines.append(f"  failed x{n}: {text}")
    return "\n".join(lines)
