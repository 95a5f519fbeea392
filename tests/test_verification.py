"""protocol.verification: when results are replicated, and which run wins the vote."""

from __future__ import annotations

import pytest

from protocol.trust import TrustParams
from protocol.verification import REFUSE_BELOW, VERIFY_BELOW, majority, needs_replica, worth_asking


def test_new_provider_at_the_prior_is_replicated() -> None:
    decision = needs_replica(TrustParams().prior)
    assert decision.replicate
    assert "below 0.70" in decision.note


def test_trusted_provider_is_not_replicated() -> None:
    decision = needs_replica(0.83)
    assert not decision.replicate
    assert decision.note == "not needed (trust 0.83)"


def test_threshold_is_inclusive_and_configurable() -> None:
    assert not needs_replica(VERIFY_BELOW).replicate
    assert needs_replica(VERIFY_BELOW - 1e-9).replicate
    assert needs_replica(0.85, verify_below=0.9).replicate


def test_one_replica_turns_verification_off() -> None:
    decision = needs_replica(0.0, replicas=1)
    assert not decision.replicate
    assert decision.note == "off"


def test_bad_result_cap_is_below_the_refuse_line() -> None:
    assert not worth_asking(TrustParams().bad_result_cap)
    assert worth_asking(TrustParams().prior)
    assert worth_asking(REFUSE_BELOW)


@pytest.mark.parametrize(
    ("fingerprints", "expected"),
    [
        (["a", "a"], [0, 1]),
        (["a", "b", "a"], [0, 2]),
        (["a", "b", "b"], [1, 2]),
        (["a", "b", "c"], None),
        (["a"], None),
        ([], None),
        ([("x", 1), ("x", 1), ("y", 2), ("y", 2)], [0, 1]),
    ],
)
def test_majority(fingerprints: list[object], expected: list[int] | None) -> None:
    assert majority(fingerprints) == expected
