"""Owner policy, pure: what this machine offers right now, and what happens to running jobs.

Theory of operation
-------------------
People run a node on the machine they work on only if it never gets in their way. The owner sets *caps* (how
much of the machine may be shared) and a *mode* (when it may be shared); the daemon measures the machine every
few seconds and feeds a :class:`Reading` (plain values: the owner's own CPU load with our jobs' CPU taken out,
the minute of the week, GPU use) to :meth:`OwnerGovernor.decide`, which answers with a :class:`Decision`:

* ``sharing`` and a ``reason`` (a sentence, never a bare bool: "why is my node not offering anything?");
* the :class:`Offer`: what the capacity ad and admission may use. It follows the caps, never the raw machine,
  and is empty while not sharing;
* an :class:`Action` for jobs already running: suspend them (the owner needs the machine; they resume later),
  preempt them (stop them and hand them back to their clients, who retry elsewhere), resume them, or nothing.

Modes:

* ``always``: share whenever the node runs (the caps still apply).
* ``idle-only``: share only after the owner's own CPU load stayed below ``idle_cpu_permille`` for ``idle_ms``;
  stop once it stayed at or above it for ``reclaim_ms``. The two waits are the hysteresis: one quiet second does
  not start sharing, one busy sample (with ``reclaim_ms`` > 0) does not stop it. An unknown load keeps the state.
* ``schedule``: share only inside the weekly :class:`Window` s (e.g. ``mon-fri 18:00-08:00``).

``pause`` (the owner, by hand) stops sharing in every mode; with ``drain`` running jobs finish, without it they
are reclaimed like any other reclaim. A job suspended longer than ``max_suspend_ms`` is preempted, so a client
never waits forever on a machine its owner kept.

GPUs: a GPU whose utilisation or memory use is above the thresholds, while no job of ours holds it, is the
owner's and is not offered. (Our jobs get whole GPUs, so all use of a GPU a job holds counts as ours; an owner
who starts using such a GPU is not detected until the job ends.)

Time comes in as ``now_ms`` and ``minute_of_week`` (Monday 00:00 is 0, local time): this module reads no clock.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, final

MINUTES_PER_DAY: Final = 24 * 60
MINUTES_PER_WEEK: Final = 7 * MINUTES_PER_DAY
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS: Final = 32
MAX_WINDOW_TEXT: Final = 64
MAX_GPU_INDEX: Final = 255
MAX_WAIT_MS: Final = 7 * 24 * 3600 * 1000  # a week: any longer wait is a typo


class OwnerPolicyError(ValueError):
    """An owner setting is invalid (from the config file, the CLI or the API). The message says which and why."""


class Mode(enum.StrEnum):
    ALWAYS = "always"
    IDLE_ONLY = "idle-only"
    SCHEDULE = "schedule"


class Reclaim(enum.StrEnum):
    """What happens to running jobs when the owner needs the machine back."""

    SUSPEND = "suspend"  # freeze them; resume when sharing again (or preempt after max_suspend_ms)
    PREEMPT = "preempt"  # stop them; their clients retry them elsewhere


class Action(enum.StrEnum):
    NONE = "none"
    SUSPEND = "suspend"
    RESUME = "resume"
    PREEMPT = "preempt"


# ----------------------------------------------------------------------------------------------- windows


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """A weekly window: on each of ``days`` (0 = Monday) from ``start`` for ``length`` minutes (may cross midnight)."""

    days: frozenset[int]
    start: int  # minute of the day, 0..1439
    length: int  # minutes, 1..1440

    def __post_init__(self) -> None:
        if not self.days or not self.days <= frozenset(range(7)):
            raise OwnerPolicyError("a window needs at least one day, 0 (Monday) to 6 (Sunday)")
        if not 0 <= self.start < MINUTES_PER_DAY or not 0 < self.length <= MINUTES_PER_DAY:
            raise OwnerPolicyError("a window starts within the day and lasts 1 minute to 24 hours")

    def contains(self, minute_of_week: int) -> bool:
        return any((minute_of_week - (d * MINUTES_PER_DAY + self.start)) % MINUTES_PER_WEEK < self.length
                   for d in self.days)  # fmt: skip

    def __str__(self) -> str:
        end = (self.start + self.length) % MINUTES_PER_DAY
        end_text = "24:00" if self.length == MINUTES_PER_DAY and self.start == 0 else _hhmm(end)
        return f"{_days_text(self.days)} {_hhmm(self.start)}-{end_text}"


_WINDOW_RE: Final = re.compile(r"^\s*(\S+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_window(text: str) -> Window:
    """Parse ``DAYS HH:MM-HH:MM``: DAYS is ``mon-fri``, ``sat,sun``, ``tue`` or ``daily``; an end at or before the
    start runs into the next day (``mon-fri 18:00-08:00`` is weeknights); ``00:00-24:00`` is the whole day.

    Raises:
        OwnerPolicyError: the text is not such a window.
    """
    if not isinstance(text, str) or len(text) > MAX_WINDOW_TEXT:
        raise OwnerPolicyError(f"a window is a short string like 'mon-fri 18:00-08:00', got {text!r}")
    m = _WINDOW_RE.match(text.lower())
    if m is None:
        raise OwnerPolicyError(f"window {text!r}: expected DAYS HH:MM-HH:MM, e.g. 'mon-fri 18:00-08:00'")
    days = _parse_days(m.group(1), text)
    sh, sm, eh, em = (int(m.group(i)) for i in range(2, 6))
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em):
        raise OwnerPolicyError(f"window {text!r}: times are 00:00 to 24:00")
    start, end = sh * 60 + sm, eh * 60 + em
    length = (end - start) % MINUTES_PER_DAY or MINUTES_PER_DAY
    return Window(days=days, start=start, length=length)


def _parse_days(spec: str, text: str) -> frozenset[int]:
    if spec in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise OwnerPolicyError(f"window {text!r}: days are mon..sun, ranges like mon-fri, lists like sat,sun")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)


def _days_text(days: frozenset[int]) -> str:
    if days == frozenset(range(7)):
        return "daily"
    return ",".join(DAYS[d] for d in sorted(days))


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# ----------------------------------------------------------------------------------------------- policy


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """The most this machine shares. 0 (or ``gpus=None``) means no cap beyond the machine itself."""

    cpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpus: tuple[int, ...] | None = None  # GPU indices that may be offered; None = all, () = none
    max_jobs: int = 2

    def __post_init__(self) -> None:
        for name in ("cpus", "memory_bytes", "disk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OwnerPolicyError(f"{name}: expected a non-negative integer (0 = no cap), got {value!r}")
        if isinstance(self.max_jobs, bool) or not isinstance(self.max_jobs, int) or not 1 <= self.max_jobs <= 1024:
            raise OwnerPolicyError(f"max_jobs: expected an integer 1..1024, got {self.max_jobs!r}")
        if self.gpus is not None and not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= MAX_GPU_INDEX for g in self.gpus
        ):
            raise OwnerPolicyError(f"gpus: expected GPU indices 0..{MAX_GPU_INDEX}, got {self.gpus!r}")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerPolicy:
    """The owner's settings. Validated on construction; change with :func:`policy_with`."""

    mode: Mode = Mode.ALWAYS
    caps: Caps = field(default_factory=Caps)
    windows: tuple[Window, ...] = ()
    idle_cpu_permille: int = 250  # the owner's own CPU use, per-mille of the whole machine, that counts as idle
    idle_ms: int = 120_000
    reclaim_ms: int = 5_000
    on_reclaim: Reclaim = Reclaim.SUSPEND
    max_suspend_ms: int = 600_000
    gpu_busy_percent: int = 10
    gpu_busy_memory_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode) or not isinstance(self.on_reclaim, Reclaim):
            raise OwnerPolicyError("mode and on_reclaim must be enum members")
        if self.mode is Mode.SCHEDULE and not self.windows:
            raise OwnerPolicyError("mode 'schedule' needs at least one window, e.g. 'mon-fri 18:00-08:00'")
        if len(self.windows) > MAX_WINDOWS:
            raise OwnerPolicyError(f"at most {MAX_WINDOWS} windows")
        _bounded(self.idle_cpu_permille, "idle_cpu_permille", 1, 1000)
        _bounded(self.gpu_busy_percent, "gpu_busy_percent", 0, 100)
        _bounded(self.gpu_busy_memory_bytes, "gpu_busy_memory_bytes", 0, 1 << 50)
        for name in ("idle_ms", "reclaim_ms", "max_suspend_ms"):
            _bounded(getattr(self, name), name, 0, MAX_WAIT_MS)

    def to_plain(self) -> dict[str, object]:
        """JSON-able form, with the keys :func:`policy_with` accepts."""
        return {
            "mode": self.mode.value,
            "cpus": self.caps.cpus,
            "memory_bytes": self.caps.memory_bytes,
            "disk_bytes": self.caps.disk_bytes,
            "gpus": None if self.caps.gpus is None else list(self.caps.gpus),
            "max_jobs": self.caps.max_jobs,
            "windows": [str(w) for w in self.windows],
            "idle_cpu_percent": self.idle_cpu_permille / 10,
            "idle_seconds": self.idle_ms / 1000,
            "reclaim_seconds": self.reclaim_ms / 1000,
            "on_reclaim": self.on_reclaim.value,
            "max_suspend_seconds": self.max_suspend_ms / 1000,
            "gpu_busy_percent": self.gpu_busy_percent,
            "gpu_busy_memory_bytes": self.gpu_busy_memory_bytes,
        }


def policy_with(policy: OwnerPolicy, changes: Mapping[str, object]) -> OwnerPolicy:
    """``policy`` with ``changes`` (plain values, keys as in :meth:`OwnerPolicy.to_plain`) applied and validated.

    Raises:
        OwnerPolicyError: an unknown key, a wrongly typed value, or a combination that is not valid.
    """
    unknown = sorted(set(changes) - POLICY_KEYS)
    if unknown:
        raise OwnerPolicyError(
            f"unknown owner setting(s) {', '.join(unknown)} (known: {', '.join(sorted(POLICY_KEYS))})"
        )
    caps_kw: dict[str, Any] = {}
    kw: dict[str, Any] = {}
    try:
        for key, value in changes.items():
            if key == "mode":
                kw["mode"] = Mode(_typed(value, str, key))
            elif key == "on_reclaim":
                kw["on_reclaim"] = Reclaim(_typed(value, str, key))
            elif key in ("cpus", "memory_bytes", "disk_bytes", "max_jobs"):
                caps_kw[key] = _typed(value, int, key)
            elif key == "gpus":
                caps_kw["gpus"] = None if value is None else tuple(_typed(value, list, key))
            elif key == "windows":
                windows = _typed(value, list, key)
                if len(windows) > MAX_WINDOWS:
                    raise OwnerPolicyError(f"at most {MAX_WINDOWS} windows")
                kw["windows"] = tuple(parse_window(w) for w in windows)
            elif key == "idle_cpu_percent":
                kw["idle_cpu_permille"] = round(_number(value, key) * 10)
            elif key in ("idle_seconds", "reclaim_seconds", "max_suspend_seconds"):
                kw[key.replace("_seconds", "_ms")] = round(_number(value, key) * 1000)
            else:  # gpu_busy_percent, gpu_busy_memory_bytes
                kw[key] = _typed(value, int, key)
        return replace(policy, caps=replace(policy.caps, **caps_kw), **kw)
    except ValueError as exc:  # Mode("x") and friends
        if isinstance(exc, OwnerPolicyError):
            raise
        raise OwnerPolicyError(f"{exc} (modes: always, idle-only, schedule; on_reclaim: suspend, preempt)") from None


def _typed(value: object, kind: type, key: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise OwnerPolicyError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0 or value > 1e9:
        raise OwnerPolicyError(f"{key}: expected a non-negative number, got {value!r}")
    return float(value)


def _bounded(value: object, name: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise OwnerPolicyError(f"{name}: expected an integer {lo}..{hi}, got {value!r}")


POLICY_KEYS: Final = frozenset(OwnerPolicy().to_plain())


# ----------------------------------------------------------------------------------------------- decisions


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class GpuReading:
    """One GPU as measured; ``ours``: a job of ours holds it (so its use is ours, not the owner's)."""

    index: int
    memory_used_bytes: int = 0
    utilization_percent: int = 0
    ours: bool = False


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One measurement of the machine, as plain values.

    Attributes:
        owner_cpu_permille: the owner's own CPU use (everything but our jobs and the daemon), per-mille of the
            whole machine; None when it could not be measured.
        minute_of_week: local time, Monday 00:00 = 0.
        disk_bytes: free space where work dirs go.
    """

    now_ms: int
    owner_cpu_permille: int | None
    minute_of_week: int
    cpus: int
    memory_bytes: int
    disk_bytes: int
    gpus: tuple[GpuReading, ...] = ()


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """What may be advertised and admitted now (all zero while not sharing)."""

    cpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpus: tuple[int, ...] = ()  # indices
    max_jobs: int = 0

    @property
    def empty(self) -> bool:
        return self.max_jobs == 0 or self.cpus == 0


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    sharing: bool
    reason: str
    offer: Offer
    action: Action = Action.NONE
    owner_gpus: tuple[int, ...] = ()  # GPUs not offered because the owner is using them


OFFER_SLACK: Final = 0.10  # memory or disk may drift this much (of the larger) before the ad is republished


def offer_moved(published: Offer, now: Offer, *, slack: float = OFFER_SLACK) -> bool:
    """Whether ``now`` differs enough from the ``published`` offer to republish the ad at once.

    CPUs, GPUs and job slots count exactly; memory and disk only past ``slack`` of the larger value. Free disk
    moves with every file written on the machine: republishing on each byte put a DHT walk and ~20 stores into
    every owner check (5 s) of every provider under load. The ad's regular refresh carries the drift anyway.
    """
    if (published.cpus, published.gpus, published.max_jobs) != (now.cpus, now.gpus, now.max_jobs):
        return True
    return any(
        abs(a - b) > slack * max(a, b)
        for a, b in ((published.memory_bytes, now.memory_bytes), (published.disk_bytes, now.disk_bytes))
    )


def capped(limit: int, machine: int) -> int:
    return machine if limit == 0 else min(limit, machine)


class OwnerGovernor:
    """The owner policy as a machine: feed it readings, read decisions.

    ``decide`` is called every few seconds with the counts of our running and suspended jobs; the hysteresis of
    idle-only mode and the suspension deadline are kept here from the readings' ``now_ms``.
    """

    def __init__(self, policy: OwnerPolicy) -> None:
        self.policy = policy
        self.paused = False
        self.drain = False
        self._idle = False  # idle-only: the owner has been away long enough
        self._below_since: int | None = None
        self._above_since: int | None = None
        self._suspended_since: int | None = None
        self.last: Decision | None = None

    def set_policy(self, policy: OwnerPolicy) -> None:
        self.policy = policy

    def pause(self, *, drain: bool) -> None:
        self.paused, self.drain = True, drain

    def resume(self) -> None:
        self.paused, self.drain = False, False

    def _track_idle(self, r: Reading) -> None:
        load = r.owner_cpu_permille
        if load is None:
            return
        if load < self.policy.idle_cpu_permille:
            self._above_since = None
            self._below_since = r.now_ms if self._below_since is None else self._below_since
            if not self._idle and r.now_ms - self._below_since >= self.policy.idle_ms:
                self._idle = True
        else:
            self._below_since = None
            self._above_since = r.now_ms if self._above_since is None else self._above_since
            if self._idle and r.now_ms - self._above_since >= self.policy.reclaim_ms:
                self._idle = False

    def _wanted(self, r: Reading) -> tuple[bool, str]:
        p = self.policy
        if p.mode is Mode.ALWAYS:
            return True, "sharing (mode always)"
        if p.mode is Mode.SCHEDULE:
            inside = [w for w in p.windows if w.contains(r.minute_of_week)]
            if inside:
                return True, f"sharing inside the window {inside[0]}"
            return False, "outside the sharing windows " + ", ".join(str(w) for w in p.windows)
        load = "unknown" if r.owner_cpu_permille is None else f"{r.owner_cpu_permille / 10:.0f}%"
        threshold = f"{p.idle_cpu_permille / 10:.0f}%"
        if self._idle:
            return True, f"sharing: the owner is idle (own CPU load {load}, threshold {threshold})"
        if self._below_since is not None:
            waited = (r.now_ms - self._below_since) / 1000
            return False, f"the owner was idle for {waited:.0f} s of the {p.idle_ms / 1000:.0f} s needed"
        return False, f"the owner is using the machine (own CPU load {load}, threshold {threshold})"

    def _offer(self, r: Reading) -> tuple[Offer, tuple[int, ...]]:
        p, caps = self.policy, self.policy.caps
        owner_gpus = tuple(g.index for g in r.gpus if not g.ours and (
            g.utilization_percent > p.gpu_busy_percent or g.memory_used_bytes > p.gpu_busy_memory_bytes))  # fmt: skip
        gpus = tuple(g.index for g in r.gpus
                     if (caps.gpus is None or g.index in caps.gpus) and g.index not in owner_gpus)  # fmt: skip
        offer = Offer(
            cpus=capped(caps.cpus, r.cpus),
            memory_bytes=capped(caps.memory_bytes, r.memory_bytes),
            disk_bytes=capped(caps.disk_bytes, r.disk_bytes),
            gpus=gpus,
            max_jobs=caps.max_jobs,
        )
        return offer, owner_gpus

    def decide(self, reading: Reading, *, running: int = 0, suspended: int = 0) -> Decision:
        """What to offer now and what to do with our ``running`` (not suspended) and ``suspended`` jobs."""
        self._track_idle(reading)
        sharing, reason = self._wanted(reading)
        if self.paused:
            sharing = False
            reason = "paused by the owner" + (" (draining: running jobs finish)" if self.drain else "")
        offer, owner_gpus = self._offer(reading)
        if not sharing:
            offer = Offer()
        if suspended == 0:
            self._suspended_since = None
        action = Action.NONE
        if sharing or (self.paused and self.drain):
            action = Action.RESUME if suspended else Action.NONE
        elif running or suspended:
            if self.policy.on_reclaim is Reclaim.PREEMPT:
                action = Action.PREEMPT
            elif (
                suspended
                and self._suspended_since is not None
                and (reading.now_ms - self._suspended_since >= self.policy.max_suspend_ms)
            ):
                action = Action.PREEMPT
                reason += f"; jobs suspended for over {self.policy.max_suspend_ms / 1000:.0f} s are handed back"
            elif running:
                action = Action.SUSPEND
        if action is Action.SUSPEND and self._suspended_since is None:
            self._suspended_since = reading.now_ms
        decision = Decision(sharing=sharing, reason=reason, offer=offer, action=action, owner_gpus=owner_gpus)
        self.last = decision
        return decision
