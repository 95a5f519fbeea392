"""Adaptive verification, pure: when a client replicates a job, and which result wins the vote.

Theory of operation
-------------------
A client cannot check a result itself, so it runs the job again elsewhere when it does not trust the provider
enough yet. :func:`needs_replica` decides from the provider's trust score: below ``verify_below`` (0.7; every new
provider starts at the 0.5 prior, so new providers are always checked) one replica runs on the next best
provider; ``replicas < 2`` turns verification off. When the two results differ a third run breaks the tie, and
:func:`majority` says which runs agree: the largest group of equal fingerprints, if at least two runs are in it.
With no such group the job is disputed. Providers trusted below ``REFUSE_BELOW`` are not asked at all: a recent
bad result caps trust at 0.3 (:mod:`protocol.trust`), under that line.

Replication assumes deterministic jobs: the same inputs give the same outputs. Two colluding providers that return
the same wrong result outvote an honest one; the simulation (``scripts/sim``) measures how often that happens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, final

VERIFY_BELOW: Final = 0.7  # results of providers trusted less than this are replicated (every new one: 0.5)
REFUSE_BELOW: Final = 0.35  # not asked at all: a recent bad result caps trust at 0.3 (protocol/trust.py)
DEFAULT_REPLICAS: Final = 2


@final
@dataclass(frozen=True, slots=True)
class VerifyDecision:
    """Whether to replicate a job, and why in words (stored with the job's result)."""

    replicate: bool
    note: str


def needs_replica(
    trust: float, *, verify_below: float = VERIFY_BELOW, replicas: int = DEFAULT_REPLICAS
) -> VerifyDecision:
    """Replicate a result of a provider trusted ``trust``, unless verification is off or the trust suffices."""
    if replicas < 2:
        return VerifyDecision(replicate=False, note="off")
    if trust >= verify_below:
        return VerifyDecision(replicate=False, note=f"not needed (trust {trust:.2f})")
    return VerifyDecision(replicate=True, note=f"trust {trust:.2f} is below {verify_below:.2f}")


def worth_asking(trust: float, *, refuse_below: float = REFUSE_BELOW) -> bool:
    """Whether a provider trusted ``trust`` may be asked for a quote at all."""
    return trust >= refuse_below


def majority(fingerprints: Sequence[Hashable]) -> list[int] | None:
    """Indices of the runs in the largest group of equal results, or None when no two runs agree.

    Among equally large groups the one whose first run came first wins (the primary's, then the replicas').
    """
    groups: dict[Hashable, list[int]] = {}
    for index, fingerprint in enumerate(fingerprints):
        groups.setdefault(fingerprint, []).append(index)
    if not groups:
        return None
    winners = max(groups.values(), key=len)
    return winners if len(winners) >= 2 else None
