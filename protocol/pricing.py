"""Prices and costs, in integer milli-credits.

A :class:`~protocol.messages.PriceSheet` charges a start fee plus CPU-seconds, GiB-seconds of memory (peak memory
times wall time) and GPU-seconds. Every division rounds up, so a provider is never paid less than its sheet says,
and the total is capped by the agreed maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from protocol.messages import Limits, PriceSheet, RejectCode, Resources, Usage

GIB: Final = 1 << 30


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cost_of(usage: Usage, sheet: PriceSheet, *, max_cost: int) -> int:
    """What a job with ``usage`` costs under ``sheet``, never more than ``max_cost``."""
    cost = (
        sheet.start_fee
        + _ceil_div(usage.cpu_ms * sheet.per_cpu_second, 1000)
        + _ceil_div(usage.peak_memory_bytes * usage.wall_ms * sheet.per_gib_second, GIB * 1000)
        + _ceil_div(usage.gpu_ms * sheet.per_gpu_second, 1000)
    )
    return min(cost, max_cost)


def worst_case_cost(resources: Resources, limits: Limits, sheet: PriceSheet) -> int:
    """The most a job can cost under ``sheet`` if it uses everything it asked for until its limits."""
    wall = limits.wall_seconds
    cpu_seconds = min(limits.cpu_seconds, resources.cpus * wall)
    return (
        sheet.start_fee
        + cpu_seconds * sheet.per_cpu_second
        + _ceil_div(resources.memory_bytes * wall * sheet.per_gib_second, GIB)
        + resources.gpus * wall * sheet.per_gpu_second
    )


def scale_sheet(sheet: PriceSheet, numerator: int, denominator: int) -> PriceSheet:
    """Every price multiplied by numerator/denominator, rounded down (used to build counter-offers)."""
    if denominator <= 0 or numerator < 0:
        raise ValueError("scale must be a non-negative fraction")
    return PriceSheet(
        start_fee=sheet.start_fee * numerator // denominator,
        per_cpu_second=sheet.per_cpu_second * numerator // denominator,
        per_gib_second=sheet.per_gib_second * numerator // denominator,
        per_gpu_second=sheet.per_gpu_second * numerator // denominator,
    )


def sheet_at_least(sheet: PriceSheet, floor: PriceSheet) -> bool:
    """Whether every price in ``sheet`` is at or above ``floor``'s."""
    return (
        sheet.start_fee >= floor.start_fee
        and sheet.per_cpu_second >= floor.per_cpu_second
        and sheet.per_gib_second >= floor.per_gib_second
        and sheet.per_gpu_second >= floor.per_gpu_second
    )


def midpoint(a: PriceSheet, b: PriceSheet) -> PriceSheet:
    """Component-wise midpoint, rounded up (a provider meeting a client half way)."""
    return PriceSheet(
        start_fee=_ceil_div(a.start_fee + b.start_fee, 2),
        per_cpu_second=_ceil_div(a.per_cpu_second + b.per_cpu_second, 2),
        per_gib_second=_ceil_div(a.per_gib_second + b.per_gib_second, 2),
        per_gpu_second=_ceil_div(a.per_gpu_second + b.per_gpu_second, 2),
    )


@final
@dataclass(frozen=True, slots=True)
class Decline:
    """A policy's refusal: a reason code for the peer and a message for humans."""

    code: RejectCode
    message: str
