from hypothesis import given
from hypothesis import strategies as st

from protocol.messages import Limits, PriceSheet, Resources, Usage
from protocol.pricing import GIB, cost_of, midpoint, scale_sheet, sheet_at_least, worst_case_cost

SHEET = PriceSheet(start_fee=100, per_cpu_second=10, per_gib_second=4, per_gpu_second=1000)


def test_cost_of_sums_every_resource_and_rounds_up():
    usage = Usage(cpu_ms=1500, wall_ms=2000, peak_memory_bytes=GIB // 2, gpu_ms=1)
    # 100 + ceil(15) + ceil(0.5 GiB * 2 s * 4 = 4) + ceil(1 ms * 1000/s = 1)
    assert cost_of(usage, SHEET, max_cost=10**9) == 100 + 15 + 4 + 1
    assert cost_of(Usage(cpu_ms=1), SHEET, max_cost=10**9) == 101  # a sliver of a CPU-second is charged


def test_cost_is_capped_by_the_agreed_maximum():
    usage = Usage(cpu_ms=10**9, wall_ms=10**9, peak_memory_bytes=GIB)
    assert cost_of(usage, SHEET, max_cost=5000) == 5000


def test_worst_case_cost():
    resources = Resources(cpus=2, memory_bytes=GIB, gpus=1)
    limits = Limits(cpu_seconds=1000, wall_seconds=10)
    assert worst_case_cost(resources, limits, SHEET) == 100 + 2 * 10 * 10 + 10 * 4 + 10 * 1000


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.integers(0, 64 * GIB),
    st.integers(0, 10**7),
    st.integers(0, 10**12),
)
def test_cost_never_exceeds_max_and_grows_with_usage(cpu, wall, memory, gpu, max_cost):
    usage = Usage(cpu_ms=cpu, wall_ms=wall, peak_memory_bytes=memory, gpu_ms=gpu)
    more = Usage(cpu_ms=cpu + 1000, wall_ms=wall, peak_memory_bytes=memory, gpu_ms=gpu)
    assert 0 <= cost_of(usage, SHEET, max_cost=max_cost) <= max_cost
    assert cost_of(more, SHEET, max_cost=10**15) > cost_of(usage, SHEET, max_cost=10**15)


def test_sheet_helpers():
    half = scale_sheet(SHEET, 1, 2)
    assert half == PriceSheet(start_fee=50, per_cpu_second=5, per_gib_second=2, per_gpu_second=500)
    assert sheet_at_least(SHEET, half)
    assert not sheet_at_least(half, SHEET)
    assert midpoint(half, SHEET) == PriceSheet(start_fee=75, per_cpu_second=8, per_gib_second=3, per_gpu_second=750)
