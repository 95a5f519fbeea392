"""protocol.trust: personalised, cost-weighted EigenTrust over receipt-bound reputation records."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.messages import Outcome, ReputationRecord
from protocol.trust import (
    DAY_MS,
    Evidence,
    TrustParams,
    compute_trust,
    record_weight,
)
from tests.factories import ALICE, BOB, digest

NOW = 1_790_000_000_000
ME = "me"
PARAMS = TrustParams()
_receipts = itertools.count()

GOOD = Outcome.SUCCESS
BAD_OUTCOMES = [Outcome.PROVIDER_FAILURE, Outcome.TIMEOUT, Outcome.BAD_RESULT]


def ev(rater, ratee, outcome=GOOD, *, score=None, cost=2000, age=DAY_MS):
    """One record bound to a fresh receipt; the score defaults to 100 for a success and 0 otherwise."""
    return Evidence(
        rater=rater,
        ratee=ratee,
        outcome=outcome,
        score=(100 if outcome is GOOD else 0) if score is None else score,
        time=NOW - age,
        cost=cost,
        receipt_hash=next(_receipts).to_bytes(8, "big"),
    )


def trust(records, **kwargs):
    return compute_trust(records, me=ME, now=NOW, **kwargs)


# ---------------------------------------------------------------------------------------------- Sybil attacks

RING = [f"sybil{i}" for i in range(50)]


def sybil_world():
    """me has 4 good jobs with honest H; 50 fresh identities praise each other and dishonest D, and bad-mouth H."""
    records = [ev(ME, "H") for _ in range(4)]
    for i, s in enumerate(RING):
        for hop in (1, 2, 3):  # receipts among themselves, some near-free, some expensive
            records.append(ev(s, RING[(i + hop) % len(RING)], cost=1 if hop % 2 else 50_000))
        records.append(ev(s, "D", cost=100_000))
        records.append(ev(s, "D", cost=1))
        records.append(ev(s, "H", Outcome.BAD_RESULT, cost=100_000))
    return records


def test_a_sybil_ring_cannot_lift_its_provider_above_an_honest_one():
    table = trust(sybil_world())
    d, h = table.explain("D"), table.explain("H")
    assert h.score > 0.8
    assert d.score == PARAMS.prior  # exactly neutral: none of the praise counts
    assert d.transitive == 0.0
    assert h.score > d.score
    assert table.ranked()[0].peer == "H"
    assert all(table.explain(s).transitive == 0.0 and table.score(s) == PARAMS.prior for s in RING)
    assert "100 records from raters without a trust path ignored" in d.explanation
    assert "50 records from raters without a trust path ignored" in h.explanation  # the bad-mouthing


def test_one_cheap_genuine_job_lets_hardly_any_trust_into_the_ring():
    table = trust([*sybil_world(), ev(ME, RING[0], cost=1)])
    d, h = table.explain("D"), table.explain("H")
    assert 0 < d.transitive < 0.01
    assert d.score < PARAMS.prior + 0.01
    assert h.score > d.score + 0.3
    assert table.ranked()[0].peer == "H"


def test_trust_flows_from_peers_me_trusts():
    """The flip side of Sybil resistance: praise from someone me has dealt with does count."""
    table = trust([ev(ME, "A"), ev(ME, "A"), ev("A", "Y"), ev("A", "Y"), ev("Y", "Z"), ev("Q", "Z")])
    y, z = table.explain("Y"), table.explain("Z")
    assert table.score("Y") > table.score("Z") > PARAMS.prior
    assert y.direct is None
    assert "via 1 trusted rater" in y.explanation
    assert "via 1 trusted rater" in z.explanation
    assert "1 record from raters without a trust path ignored" in z.explanation  # Q's


# ---------------------------------------------------------------------------------------------- direct experience


def test_a_recent_bad_result_sinks_a_provider_whatever_others_say():
    vouchers = [f"voucher{i}" for i in range(10)]
    records = [ev(ME, v, cost=10_000) for v in vouchers]
    records += [ev(v, "X", cost=10_000) for v in vouchers for _ in range(20)]
    records += [ev(ME, "X", age=10 * DAY_MS) for _ in range(5)]
    praised = trust(records)
    assert praised.score("X") > 0.8
    assert praised.explain("X").transitive == 1.0
    records.append(ev(ME, "X", Outcome.BAD_RESULT, cost=1, age=2 * DAY_MS))  # even a near-free job
    table = trust(records)
    x = table.explain("X")
    assert x.score < 0.5
    assert x.score == PARAMS.bad_result_cap
    assert "capped at 0.30 by a bad result 2 days ago" in x.explanation
    later = compute_trust(records, me=ME, now=NOW + 60 * DAY_MS)
    assert later.score("X") > PARAMS.bad_result_cap  # the cap is lifted after the window


def test_expensive_bad_results_weigh_heavier_than_failures():
    bad = trust([ev(ME, "X"), ev(ME, "X", Outcome.BAD_RESULT)])
    failed = trust([ev(ME, "X"), ev(ME, "X", Outcome.PROVIDER_FAILURE)])
    later = NOW + 100 * DAY_MS  # past the cap window: only the weighing differs
    bad_later = compute_trust([ev(ME, "X"), ev(ME, "X", Outcome.BAD_RESULT)], me=ME, now=later)
    failed_later = compute_trust([ev(ME, "X"), ev(ME, "X", Outcome.PROVIDER_FAILURE)], me=ME, now=later)
    assert bad.score("X") < failed.score("X") <= PARAMS.prior
    assert bad_later.score("X") < failed_later.score("X")


def test_unknown_peers_get_the_prior():
    table = trust([ev(ME, "H")])
    unknown = table.explain("nobody")
    assert table.score("nobody") == 0.5
    assert (unknown.direct, unknown.transitive, unknown.evidence_count) == (None, 0.0, 0)
    assert "no evidence" in unknown.explanation
    assert trust([]).ranked() == []
    assert ME not in {s.peer for s in table.ranked()}


def test_explanations_give_the_counts():
    records = [ev(ME, "X") for _ in range(3)]
    records += [ev(ME, "X", Outcome.TIMEOUT, age=90 * DAY_MS), ev(ME, "X", Outcome.BAD_RESULT, age=60 * DAY_MS)]
    records += [ev("Q", "X")]
    x = trust(records).explain("X")
    assert x.evidence_count == 6
    assert "direct: 3 good jobs, 1 failed job, 1 bad result (weight " in x.explanation
    assert "transitive 1.00 via 0 trusted raters and your own rating" in x.explanation
    assert "1 record from raters without a trust path ignored" in x.explanation
    assert x.explanation.startswith(f"score {x.score:.2f}: ")


def test_a_rater_counts_once_per_receipt():
    once = ev(ME, "X", Outcome.BAD_RESULT, age=3 * DAY_MS)
    revised = Evidence(**{**_fields(once), "outcome": GOOD, "score": 100, "time": NOW - DAY_MS})
    table = trust([once, revised, revised])
    assert table.explain("X").evidence_count == 1
    assert table.score("X") > PARAMS.prior  # the latest record about that receipt wins


def _fields(e):
    return {name: getattr(e, name) for name in Evidence.__dataclass_fields__}


def test_evidence_from_a_record_and_validation():
    record = ReputationRecord(
        rater=ALICE.peer_id, ratee=BOB.peer_id, receipt_hash=digest("r"), outcome=GOOD, score=90, time=NOW
    )
    e = Evidence.from_record(record, cost=1234)
    assert (e.rater, e.ratee, e.score, e.cost, e.receipt_hash) == (ALICE.peer_id, BOB.peer_id, 90, 1234, digest("r"))
    with pytest.raises(LocalProtocolError):
        ev("X", "X")
    with pytest.raises(LocalProtocolError):
        ev(ME, "X", score=101)
    with pytest.raises(LocalProtocolError):
        ev(ME, "X", cost=-1)
    with pytest.raises(LocalProtocolError):
        TrustParams(alpha=1.0)


# ---------------------------------------------------------------------------------------------- properties

PEERS = [ME, "a", "b", "c", "d", "e"]


def records(peers=PEERS, raters=None, max_size=30):
    """Any evidence among ``peers`` (raters drawn from ``raters`` if given)."""
    pairs = [(rater, ratee) for rater in raters or peers for ratee in peers if rater != ratee]
    record = st.tuples(
        st.sampled_from(pairs),
        st.sampled_from(list(Outcome)),
        st.integers(0, 100),
        st.integers(0, 100_000),
        st.integers(-DAY_MS, 365 * DAY_MS),
    )
    return st.lists(record, max_size=max_size).map(
        lambda rows: [ev(r, e, o, score=s, cost=c, age=a) for (r, e), o, s, c, a in rows]
    )


@given(records())
def test_scores_are_bounded(world):
    table = trust(world)
    for s in table.ranked():
        assert 0.0 <= s.score <= 1.0
        assert 0.0 <= s.transitive <= 1.0
        assert s.direct is None or 0.0 <= s.direct <= 1.0
    assert [s.score for s in table.ranked()] == sorted((s.score for s in table.ranked()), reverse=True)


@given(
    records(),
    st.sampled_from(PEERS[1:]),
    st.integers(0, 100),
    st.integers(0, 100_000),
    st.integers(0, 365 * DAY_MS),
)
def test_a_good_direct_record_never_lowers_a_score(world, peer, score, cost, age):
    before = trust(world).score(peer)
    after = trust([*world, ev(ME, peer, GOOD, score=score, cost=cost, age=age)]).score(peer)
    assert after >= before - 1e-9  # the walk stops at tolerance 1e-12; allow for that and rounding


@given(st.integers(1, 10**9), st.integers(0, 365 * DAY_MS), st.integers(1, 365 * DAY_MS))
def test_older_evidence_weighs_less(cost, age, older_by):
    newer, older = ev(ME, "X", cost=cost, age=age), ev(ME, "X", cost=cost, age=age + older_by)
    assert record_weight(older, now=NOW) < record_weight(newer, now=NOW)
    half = ev(ME, "X", cost=cost, age=age + PARAMS.half_life_ms)
    assert record_weight(half, now=NOW) == pytest.approx(record_weight(newer, now=NOW) / 2)
    # good news fades towards the prior from above, bad news from below
    assert trust([newer]).score("X") >= trust([older]).score("X") >= PARAMS.prior
    failed, failed_older = (ev(ME, "X", Outcome.TIMEOUT, cost=cost, age=a) for a in (age, age + older_by))
    assert trust([failed]).score("X") <= trust([failed_older]).score("X") <= PARAMS.prior


HONEST = [ME, "a", "b", "c"]
RING_PEERS = [f"r{i}" for i in range(5)]


def honest_world():
    """Any records among honest peers, plus complaints (never praise) from honest peers about ring peers."""
    complaint = st.tuples(
        st.sampled_from([(h, r) for h in HONEST for r in RING_PEERS]),
        st.sampled_from(BAD_OUTCOMES),
        st.integers(0, 10_000),
    )
    return st.tuples(records(peers=HONEST), st.lists(complaint, max_size=5)).map(
        lambda w: w[0] + [ev(h, r, o, cost=c) for (h, r), o, c in w[1]]
    )


@given(honest_world(), records(peers=HONEST[1:] + RING_PEERS, raters=RING_PEERS, max_size=40))
def test_records_by_raters_without_a_trust_path_change_nothing(world, ring):
    """The Sybil-ring invariant, precisely: let U be the peers (not me) that no chain of positive opinions links to
    me's pre-trusted set. Adding any records whose raters are all in U changes no peer's score, and leaves every
    peer of U with transitive trust 0, so at or below the prior (below it only for me's own complaints)."""
    before = trust(world)
    assert all(before.explain(r).transitive == 0.0 for r in RING_PEERS)  # U includes the ring
    after = trust([*world, *ring])
    for peer in HONEST[1:] + RING_PEERS:
        assert after.score(peer) == before.score(peer)
    for r in RING_PEERS:
        assert after.explain(r).transitive == 0.0
        assert after.score(r) <= PARAMS.prior


@given(st.integers(1, 1000), st.integers(1, 2))
def test_one_expensive_job_outweighs_many_near_free_ones(n, cheap_cost):
    dear = ev(ME, "A", cost=10_000)  # 10 credits
    cheap = [ev(ME, "B", cost=cheap_cost) for _ in range(n)]  # at most 2 credits in all
    assert record_weight(dear, now=NOW) > sum(record_weight(e, now=NOW) for e in cheap)
    table = trust([dear, *cheap])
    assert table.explain("A").direct_weight > table.explain("B").direct_weight
    assert table.score("A") > table.score("B")


@given(st.lists(st.integers(0, 10**7), max_size=50))
def test_weight_is_bounded_by_what_was_paid(costs):
    """Splitting a payment into many jobs never buys more weight than the payment itself (log1p(x) <= x)."""
    jobs = [ev(ME, "X", cost=c, age=0) for c in costs]
    assert sum(record_weight(e, now=NOW) for e in jobs) <= sum(costs) / PARAMS.cost_unit + 1e-9


def test_large_worlds_stay_fast():
    """O(records + iterations x edges): 8,000 records among 1,000 peers, in well under a second."""
    peers = [f"p{i}" for i in range(1000)]
    world = [ev(ME, peers[i]) for i in range(10)]
    world += [ev(peers[i], peers[(i + 7 * k) % 1000], cost=100 + k) for i in range(1000) for k in range(1, 9)]
    table = trust(world)
    assert len(table.ranked()) == 1000
    assert all(s.transitive > 0 for s in table.ranked())  # every peer is reachable from me's ten
