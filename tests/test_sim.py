"""scripts/sim: the simulator is deterministic and really runs the project's policy code (issue 11).

Small networks only (a few seconds each); docs/simulation.md has the N = 1,000 and 10,000 runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from protocol import trust as trust_module
from protocol import verification
from protocol.trust import TrustTable
from scripts.sim.population import SimConfig
from scripts.sim.run import main, simulate

SMALL = dataclasses.replace(SimConfig(), nodes=120, days=2)


@pytest.fixture(scope="module")
def coop() -> dict[str, Any]:
    return simulate(SMALL, 7, ("coop",))["coop"]


def test_same_seed_same_numbers(coop: dict[str, Any]) -> None:
    assert simulate(SMALL, 7, ("coop",))["coop"] == coop
    other = simulate(SMALL, 8, ("coop",))["coop"]
    assert other["jobs"]["submitted"] != coop["jobs"]["submitted"] or other != coop


def test_the_run_exercises_the_market(coop: dict[str, Any]) -> None:
    assert coop["jobs"]["submitted"] > 50
    assert coop["jobs"]["completed"] > 0.7 * coop["jobs"]["submitted"]
    assert coop["model"]["trust_computations"] > 0
    assert coop["model"]["signed_bundles_verified"] > 0
    assert coop["replicated_work_share"] > 0  # new providers start at the 0.5 prior, below verify_below
    assert sum(coop["caught"].values()) > 0  # outvoted cheats got bad-result records


def test_a_broken_trust_function_lets_the_sybils_through(coop: dict[str, Any], monkeypatch) -> None:
    """Trusting everyone fully (a deliberately broken compute_trust) turns verification off for the Sybil ring."""

    def trusts_everyone(evidence, *, me, now, params):
        return TrustTable(prior=1.0, scores={})

    monkeypatch.setattr(trust_module, "compute_trust", trusts_everyone)
    broken = simulate(SMALL, 7, ("coop",))["coop"]
    assert broken["wrong_accepted"]["sybil"] > coop["wrong_accepted"]["sybil"] + 0.01
    assert broken["wrong_accepted_total"] > 2 * coop["wrong_accepted_total"]
    assert broken["replicated_work_share"] == 0


def test_the_verification_policy_is_the_projects(coop: dict[str, Any], monkeypatch) -> None:
    monkeypatch.setattr(verification, "needs_replica", lambda trust, **_: verification.VerifyDecision(False, "off"))
    unchecked = simulate(SMALL, 7, ("coop",))["coop"]
    assert unchecked["replicated_work_share"] == 0
    assert unchecked["wrong_accepted_total"] > coop["wrong_accepted_total"]


def test_defaults_are_the_daemons() -> None:
    from node.market import jobs

    config = SimConfig()
    assert config.k == jobs.DEFAULT_K
    assert config.max_attempts == jobs.MAX_ATTEMPTS
    assert config.busy_patience_ms == jobs.BUSY_PATIENCE_S * 1000
    assert config.verify_below == verification.VERIFY_BELOW == jobs.VERIFY_BELOW


def test_command_line_prints_the_measures(capsys) -> None:
    assert main(["--nodes", "100", "--days", "1", "--modes", "off,eigentrust"]) == 0
    out = capsys.readouterr().out
    assert "wrong results accepted: sybil" in out
    assert "eigentrust" in out
