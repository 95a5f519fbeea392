import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.market import MarketPolicy, Offer, explain_failures, rank_offers, surge_sheet
from protocol.messages import PriceSheet, RejectCode, Resources
from protocol.pricing import Decline
from tests.factories import ALICE, NOW, quote_request

FLOOR = PriceSheet(start_fee=100, per_cpu_second=10, per_gib_second=2, per_gpu_second=1000)


def policy(**kwargs):
    base = {"floor": FLOOR, "cpus": 4, "memory_bytes": 8 << 30, "disk_bytes": 100 << 30, "free_slots": 2}
    return MarketPolicy(**(base | kwargs))


def test_idle_provider_quotes_its_floor():
    assert policy().quote(quote_request(), now=NOW) == FLOOR


@given(st.integers(0, 999))
def test_prices_rise_with_load(load):
    lower = surge_sheet(FLOOR, load)
    higher = surge_sheet(FLOOR, load + 1)
    assert lower.per_cpu_second <= higher.per_cpu_second
    assert lower.per_cpu_second >= FLOOR.per_cpu_second
    assert surge_sheet(FLOOR, 1000).per_cpu_second == 2 * FLOOR.per_cpu_second


@pytest.mark.parametrize(
    ("kwargs", "request_kwargs", "code"),
    [
        ({"free_slots": 0}, {}, RejectCode.BUSY),
        ({"cpus": 0}, {}, RejectCode.INSUFFICIENT_RESOURCES),
        ({"blocked": frozenset({ALICE.peer_id})}, {}, RejectCode.BLOCKED_PEER),
        ({}, {"max_price": 1}, RejectCode.BELOW_FLOOR),
    ],
)
def test_declines_carry_reasons(kwargs, request_kwargs, code):
    decision = policy(**kwargs).quote(quote_request(**request_kwargs), now=NOW)
    assert isinstance(decision, Decline)
    assert decision.code is code
    assert decision.message


def test_gpu_admission_matches_models():
    import dataclasses

    request = quote_request()
    gpu_request = dataclasses.replace(request, resources=Resources(cpus=1, gpus=1, gpu_model="4090"))
    assert isinstance(policy().quote(gpu_request, now=NOW), Decline)
    with_gpu = policy(gpu_models=("NVIDIA GeForce RTX 4090",))
    assert with_gpu.admit(gpu_request) is None


def test_ranking_prefers_cheap_then_trusted_then_near():
    cheap = Offer("a", cost=100)
    dear = Offer("b", cost=200)
    assert rank_offers([dear, cheap])[0] is cheap
    trusted = Offer("c", cost=120, trust=1.0)
    assert rank_offers([cheap, trusted])[0] is trusted
    far = Offer("d", cost=100, latency_ms=500)
    assert rank_offers([far, cheap])[0] is cheap


def test_failures_are_explained_in_one_sentence():
    text = explain_failures([RejectCode.BUSY, RejectCode.BUSY, RejectCode.BELOW_FLOOR], max_price=500)
    assert text == "3 providers: 2 busy, 1 priced above your max price (your max price is 500 milli-credits)"
    assert "no provider" in explain_failures([], max_price=1)
