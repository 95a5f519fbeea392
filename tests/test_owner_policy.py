"""The pure owner policy: windows, caps, idle-only hysteresis, reclaim actions, GPU use, validation."""

from dataclasses import replace

import pytest

from protocol.owner import (
    Action,
    Caps,
    GpuReading,
    Mode,
    Offer,
    OwnerGovernor,
    OwnerPolicy,
    OwnerPolicyError,
    Reading,
    Reclaim,
    offer_moved,
    parse_window,
    policy_with,
)

GIB = 1 << 30
MON, TUE, SAT = 0, 1440, 5 * 1440


def reading(now_s: float = 0, load: int | None = 0, *, minute: int = MON + 600, gpus=()) -> Reading:
    return Reading(now_ms=int(now_s * 1000), owner_cpu_permille=load, minute_of_week=minute, cpus=8,
                   memory_bytes=32 * GIB, disk_bytes=100 * GIB, gpus=gpus)  # fmt: skip


def test_windows_parse_and_contain():
    nights = parse_window("mon-fri 18:00-08:00")
    assert str(nights) == "mon,tue,wed,thu,fri 18:00-08:00"
    assert nights.contains(MON + 18 * 60)
    assert nights.contains(TUE + 7 * 60 + 59)  # Monday night runs into Tuesday morning
    assert not nights.contains(TUE + 8 * 60)
    assert not nights.contains(MON + 12 * 60)
    assert nights.contains(SAT + 7 * 60)  # Friday night into Saturday
    assert not nights.contains(SAT + 20 * 60)
    weekend = parse_window("sat,sun 00:00-24:00")
    assert weekend.length == 1440
    assert weekend.contains(SAT + 1439 + 1440)  # Sunday 23:59
    assert not weekend.contains(0)  # Monday 00:00
    wrap = parse_window("sun-mon 10:00-11:00")
    assert wrap.days == frozenset({6, 0})
    assert parse_window("daily 09:00-09:00").length == 1440


@pytest.mark.parametrize(
    "text", ["", "mon", "mon 25:00-26:00", "funday 10:00-11:00", "mon 10:60-11:00", "mon 24:01-01:00", "x" * 100]
)
def test_bad_windows_are_refused_with_a_reason(text):
    with pytest.raises(OwnerPolicyError, match="window"):
        parse_window(text)


def test_caps_shape_the_offer_never_the_raw_machine():
    gov = OwnerGovernor(OwnerPolicy(caps=Caps(cpus=2, memory_bytes=4 * GIB, disk_bytes=0, gpus=(1,), max_jobs=3)))
    gpus = (GpuReading(index=0), GpuReading(index=1))
    d = gov.decide(reading(gpus=gpus))
    assert d.sharing
    assert (d.offer.cpus, d.offer.memory_bytes, d.offer.disk_bytes) == (2, 4 * GIB, 100 * GIB)
    assert d.offer.gpus == (1,)
    assert d.offer.max_jobs == 3
    big = OwnerGovernor(OwnerPolicy(caps=Caps(cpus=64, memory_bytes=64 * GIB)))
    assert (big.decide(reading()).offer.cpus, big.decide(reading()).offer.memory_bytes) == (8, 32 * GIB)


def test_a_gpu_the_owner_uses_is_not_offered():
    gov = OwnerGovernor(OwnerPolicy(gpu_busy_percent=10, gpu_busy_memory_bytes=GIB))
    gpus = (
        GpuReading(index=0, utilization_percent=50),  # the owner is training something
        GpuReading(index=1, memory_used_bytes=2 * GIB),  # the owner's game holds memory
        GpuReading(index=2, utilization_percent=99, memory_used_bytes=8 * GIB, ours=True),  # our job: ours
        GpuReading(index=3, utilization_percent=5, memory_used_bytes=GIB // 2),  # below both thresholds
    )
    d = gov.decide(reading(gpus=gpus))
    assert d.owner_gpus == (0, 1)
    assert d.offer.gpus == (2, 3)


def test_idle_only_hysteresis():
    gov = OwnerGovernor(OwnerPolicy(mode=Mode.IDLE_ONLY, idle_cpu_permille=250, idle_ms=60_000, reclaim_ms=5_000))
    assert not gov.decide(reading(0, None)).sharing  # nothing measured yet
    assert not gov.decide(reading(1, 100)).sharing
    d = gov.decide(reading(30, 100))
    assert not d.sharing
    assert "idle for 29 s of the 60 s" in d.reason
    assert d.offer.empty
    assert not gov.decide(reading(40, 600)).sharing  # the owner came back: the wait starts over
    assert not gov.decide(reading(41, 100)).sharing
    assert not gov.decide(reading(100, 100)).sharing
    d = gov.decide(reading(101, 100))
    assert d.sharing
    assert d.offer.cpus == 8
    assert gov.decide(reading(102, 900)).sharing  # one busy sample is not enough (reclaim_ms)
    assert gov.decide(reading(103, 100)).sharing
    assert gov.decide(reading(104, 900)).sharing
    assert gov.decide(reading(106, None)).sharing  # unknown load keeps the state
    d = gov.decide(reading(109, 900))
    assert not d.sharing
    assert "owner is using the machine (own CPU load 90%" in d.reason


def test_schedule_mode():
    gov = OwnerGovernor(OwnerPolicy(mode=Mode.SCHEDULE, windows=(parse_window("mon-fri 18:00-08:00"),)))
    assert not gov.decide(reading(minute=MON + 12 * 60)).sharing
    assert gov.decide(reading(minute=MON + 19 * 60)).sharing
    with pytest.raises(OwnerPolicyError, match="needs at least one window"):
        OwnerPolicy(mode=Mode.SCHEDULE)


def test_reclaim_suspends_resumes_and_preempts_after_too_long():
    policy = OwnerPolicy(mode=Mode.IDLE_ONLY, idle_ms=0, reclaim_ms=0, max_suspend_ms=60_000)
    gov = OwnerGovernor(policy)
    assert gov.decide(reading(0, 0), running=1).action is Action.NONE
    assert gov.decide(reading(1, 900), running=1).action is Action.SUSPEND
    assert gov.decide(reading(2, 900), running=0, suspended=1).action is Action.NONE
    assert gov.decide(reading(3, 0), suspended=1).action is Action.RESUME
    assert gov.decide(reading(4, 900), running=1).action is Action.SUSPEND
    assert gov.decide(reading(63, 900), suspended=1).action is Action.NONE
    d = gov.decide(reading(64, 900), suspended=1)
    assert d.action is Action.PREEMPT
    assert "handed back" in d.reason
    gov.set_policy(policy_with(policy, {"on_reclaim": "preempt"}))
    assert gov.decide(reading(65, 900), running=1).action is Action.PREEMPT


def test_pause_and_drain():
    gov = OwnerGovernor(OwnerPolicy())
    gov.pause(drain=True)
    d = gov.decide(reading(), running=2)
    assert (d.sharing, d.action, d.offer.empty) == (False, Action.NONE, True)
    assert "draining" in d.reason
    assert gov.decide(reading(), suspended=1).action is Action.RESUME  # a drain lets suspended jobs finish too
    gov.pause(drain=False)
    assert gov.decide(reading(), running=2).action is Action.SUSPEND
    gov.resume()
    d = gov.decide(reading(), suspended=2)
    assert (d.sharing, d.action) == (True, Action.RESUME)


def test_policy_with_validates_plain_values():
    p = policy_with(
        OwnerPolicy(),
        {"mode": "schedule", "windows": ["sat,sun 00:00-24:00"], "cpus": 4, "memory_bytes": GIB, "gpus": [0],
         "idle_cpu_percent": 12.5, "idle_seconds": 30, "on_reclaim": "preempt", "max_jobs": 1},
    )  # fmt: skip
    assert p.mode is Mode.SCHEDULE
    assert p.on_reclaim is Reclaim.PREEMPT
    assert (p.caps.cpus, p.caps.memory_bytes, p.caps.gpus, p.caps.max_jobs) == (4, GIB, (0,), 1)
    assert (p.idle_cpu_permille, p.idle_ms) == (125, 30_000)
    assert policy_with(p, p.to_plain()) == p  # the plain form round-trips
    assert policy_with(p, {"gpus": None}).caps.gpus is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mode": "sometimes"}, "modes: always"),
        ({"cpus": -1}, "cpus"),
        ({"cpus": True}, "cpus"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"gpus": [0, "1"]}, "gpus"),
        ({"gpus": "all"}, "gpus"),
        ({"windows": "mon 10:00-11:00"}, "windows"),
        ({"windows": ["mon 10:00-11:00"] * 33}, "at most 32"),
        ({"idle_cpu_percent": 0}, "idle_cpu_permille"),
        ({"idle_seconds": float("nan")}, "idle_seconds"),
        ({"idle_seconds": 10**9}, "idle_ms"),
        ({"mode": "schedule"}, "needs at least one window"),
        ({"surprise": 1}, "unknown owner setting"),
    ],
)
def test_policy_with_refuses_bad_values(changes, match):
    with pytest.raises(OwnerPolicyError, match=match):
        policy_with(OwnerPolicy(), changes)


def test_the_ad_follows_cpus_gpus_and_slots_exactly_but_memory_and_disk_only_past_the_slack():
    base = Offer(cpus=4, memory_bytes=16 * GIB, disk_bytes=100 * GIB, gpus=(0,), max_jobs=2)
    assert not offer_moved(base, base)
    assert not offer_moved(base, replace(base, disk_bytes=100 * GIB - 4096))  # a file written somewhere
    assert not offer_moved(base, replace(base, disk_bytes=91 * GIB, memory_bytes=15 * GIB))  # within 10%
    assert offer_moved(base, replace(base, disk_bytes=89 * GIB))
    assert offer_moved(base, replace(base, memory_bytes=18 * GIB))
    assert offer_moved(base, replace(base, disk_bytes=0))
    assert offer_moved(base, replace(base, cpus=3))
    assert offer_moved(base, replace(base, gpus=()))
    assert offer_moved(base, replace(base, max_jobs=1))
    assert offer_moved(base, Offer())  # stopped sharing: everything goes
