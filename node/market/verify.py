"""Adaptive verification on the client side: replicate a job when its provider is not trusted enough yet.

The decision and the vote are pure (protocol/verification.py: ``needs_replica``, ``majority``); this module runs
them. A replica is the same job under its own wire id ``<job id>-v<n>``, run on a provider the job has not
used, with its files under ``DATA_DIR/jobs/<id>/v<n>/``. Two runs that agree settle it; two that differ call a
third. Every run in the vote is rated (a good result 100, an outvoted one 0), and when the first provider is
outvoted the majority's stdout, stderr and outputs replace its own, so what the user gets is what most
providers returned.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.messages import Outcome
from protocol.verification import majority, needs_replica


class ResultDisputed(Exception):
    """Replicas of the job disagree and no majority exists: the job fails rather than return a guess."""


@dataclass
class Run:
    """One run of a job: who ran it, under which wire id, and its outcome (result, receipt, cost)."""

    provider: str
    wire_id: str
    outcome: dict[str, Any]

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        """What two runs must share to agree: exit status, stdout digest and output digests."""
        result = self.outcome["result"]
        outputs = tuple(sorted((name, o["sha256"]) for name, o in result["outputs"].items()))
        return (self.outcome["exit_status"], result["stdout_sha256"], outputs)


# Run the job again as ``<job id>-v<n>`` on a provider not in the set; None when nobody could.
Replicate = Callable[[str, dict[str, Any], int, set[str]], Awaitable[Run | None]]
Rate = Callable[[str, Outcome, int], Awaitable[None]]


def with_note(outcome: dict[str, Any], note: str, verified_by: list[str]) -> dict[str, Any]:
    """The outcome to store, its result carrying the ``verification`` note and who confirmed it."""
    result = dict(outcome["result"], verification=note, verified_by=verified_by)
    return dict(outcome, result=result, provider=result["provider"])


@dataclass
class Verifier:
    replicate: Replicate
    rate: Rate
    trust: Callable[[str], float]
    jobs_dir: Path
    verify_below: float
    replicas: int

    async def verify(
        self, job_id: str, req: dict[str, Any], provider: str, outcome: dict[str, Any], excluded: set[str]
    ) -> dict[str, Any]:
        """Replicate the job when ``provider`` is not trusted enough yet, and settle on the majority's result.

        Returns the outcome to store (the majority's, when the first provider was outvoted), with a
        ``verification`` note in its result. Raises :class:`ResultDisputed` when results differ and no
        majority can be had.
        """
        primary = Run(provider, job_id, outcome)
        decision = needs_replica(self.trust(provider), verify_below=self.verify_below, replicas=self.replicas)
        if not decision.replicate:
            await self.rate(job_id, Outcome.SUCCESS, 100)
            return with_note(outcome, decision.note, [])
        replica = await self.replicate(job_id, req, 1, set(excluded))
        if replica is None:
            await self.rate(job_id, Outcome.SUCCESS, 100)
            return with_note(outcome, "unverified: no second provider was available for a replica", [])
        runs = [primary, replica]
        if primary.fingerprint != replica.fingerprint:
            tie = await self.replicate(job_id, req, 2, set(excluded) | {replica.provider})
            if tie is None:
                raise ResultDisputed(
                    f"results of {provider[:16]}… and {replica.provider[:16]}… differ, and no third provider could "
                    "break the tie"
                )
            runs.append(tie)
        agreeing = majority([run.fingerprint for run in runs])
        if agreeing is None:
            raise ResultDisputed("three providers returned three different results")
        winners = [runs[i] for i in agreeing]
        for run in runs:
            good = run in winners
            await self.rate(run.wire_id, Outcome.SUCCESS if good else Outcome.BAD_RESULT, 100 if good else 0)
        others = [r.provider for r in winners if r is not primary]
        if primary in winners:
            return with_note(outcome, f"matched by {len(others)} replica(s)", others)
        best = winners[0]
        self._adopt_files(job_id, best)
        fixed = dict(best.outcome)
        fixed["result"] = dict(fixed["result"], provider=best.provider)
        return with_note(fixed, f"{provider[:16]}… was outvoted: its result differed from the majority", others)

    def _adopt_files(self, job_id: str, best: Run) -> None:
        """Move the majority replica's stdout, stderr and outputs over the outvoted first run's."""
        job_dir = self.jobs_dir / job_id
        source = job_dir / best.wire_id.rsplit("-", 1)[1]
        for name in ("stdout", "stderr"):
            (source / name).replace(job_dir / name)
        if (source / "outputs").exists():
            shutil.rmtree(job_dir / "outputs", ignore_errors=True)
            (source / "outputs").replace(job_dir / "outputs")
