"""Owner control, the mechanism: measure the machine, apply the owner policy, act on jobs and the ad.

Theory of operation: every ``check_seconds`` (and at once after ``node pause``/``resume``/``policy``) the
:class:`OwnerService` builds a :class:`~protocol.owner.Reading` (capacity probe, the owner's own CPU load, the
local minute of the week, per-GPU use) and asks the pure :class:`~protocol.owner.OwnerGovernor` what to do.
It then, in this order:

1. applies the caps to admission (the provider's slots and GPU choice, the executor's memory/disk caps) and
   refuses new quotes and jobs while not sharing;
2. suspends, resumes or preempts running jobs (the executor freezes them; the provider hands preempted jobs
   back to their clients with a ``preempted`` reject, which the client retries on another provider);
3. republishes the capacity ad at once when what is offered changed (an ad with nothing in it while not
   sharing: it replaces the old one, which would otherwise live until its TTL).

The owner's CPU load is the machine's busy CPU time minus our jobs' CPU time (the executor's monotonic count,
from their cgroups or process trees) minus the daemon's own, over the interval since the last check. Test hook:
with ``COOP_OWNER_LOAD_FILE`` set, the owner's load is read from that file instead (a number, percent of the
whole machine; a missing file reads as 0), so multi-process tests can simulate an owner on a busy shared
machine where real measurement would see everyone else's work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import psutil
import trio

from node.capacity.summary import MachineCapacity
from node.market.provider import ProviderService
from node.sandbox.executor import Executor
from protocol.owner import (
    Action,
    Decision,
    GpuReading,
    OwnerGovernor,
    OwnerPolicy,
    Reading,
    offer_moved,
    policy_with,
)

log = logging.getLogger(__name__)

OWNER_LOAD_FILE_ENV: Final = "COOP_OWNER_LOAD_FILE"
MAX_LOAD_FILE_BYTES: Final = 64

LoadSource = Callable[[], int | None]


def busy_and_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds summed over all CPUs, from ``psutil.cpu_times()``.

    Idle and iowait are not busy; guest time is already inside user/nice, so it is not added twice.
    """
    fields = times._asdict()
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


def owner_permille(*, busy: float, total: float, ours: float) -> int:
    """The owner's share of the machine, per-mille: busy time that was not ours, over all CPU time."""
    if total <= 0:
        return 0
    return max(0, min(1000, round((busy - ours) / total * 1000)))


class CpuLoad:
    """The owner's CPU load since the previous call (None on the first call: there is no interval yet)."""

    def __init__(self, jobs_cpu_seconds: Callable[[], float]) -> None:
        self._jobs_cpu_seconds = jobs_cpu_seconds
        self._process = psutil.Process()
        self._last: tuple[float, float, float] | None = None

    def snapshot(self) -> tuple[float, float, float]:
        """(machine busy, machine total, ours) in CPU seconds; ours = the daemon's own CPU plus our jobs'."""
        busy, total = busy_and_total(psutil.cpu_times())
        own = self._process.cpu_times()
        return busy, total, own.user + own.system + self._jobs_cpu_seconds()

    def __call__(self) -> int | None:
        now = self.snapshot()
        last, self._last = self._last, now
        if last is None or now[1] <= last[1]:
            return None
        return owner_permille(busy=now[0] - last[0], total=now[1] - last[1], ours=now[2] - last[2])


class FileLoad:
    """The test hook: the owner's load, in percent of the machine, read from a file on every check."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> int | None:
        try:
            with self.path.open("rb") as f:
                text = f.read(MAX_LOAD_FILE_BYTES).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot read the owner load file %s: %s", self.path, exc)
            return None
        try:
            percent = float(text)
        except ValueError:
            log.warning("owner load file %s holds %r, not a percentage", self.path, text[:20])
            return None
        return max(0, min(1000, round(percent * 10))) if percent == percent else None


def load_source(environ: Mapping[str, str], jobs_cpu_seconds: Callable[[], float]) -> LoadSource:
    path = environ.get(OWNER_LOAD_FILE_ENV)
    if path:
        log.warning("owner load read from %s (%s test hook), not measured", path, OWNER_LOAD_FILE_ENV)
        return FileLoad(Path(path))
    return CpuLoad(jobs_cpu_seconds)


def minute_of_week(t: time.struct_time) -> int:
    """Monday 00:00 = 0, in the time zone of ``t``."""
    return t.tm_wday * 1440 + t.tm_hour * 60 + t.tm_min


def _local_minute() -> int:
    return minute_of_week(time.localtime())


class OwnerService:
    """Applies the owner policy to this node's provider, executor and capacity ad."""

    def __init__(
        self,
        *,
        policy: OwnerPolicy,
        probe: Callable[[], MachineCapacity],
        load: LoadSource,
        executor: Executor | None,
        provider: ProviderService | None,
        publish: Callable[[], Awaitable[None]],
        clock_ms: Callable[[], int],
        check_seconds: float = 5.0,
        local_minute: Callable[[], int] = _local_minute,
        say: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.governor = OwnerGovernor(policy)
        self.probe = probe
        self.load = load
        self.executor = executor
        self.provider = provider
        self.publish = publish
        self.clock_ms = clock_ms
        self.check_seconds = check_seconds
        self.local_minute = local_minute
        self.say = say
        self.decision: Decision | None = None
        self._advertised: Decision | None = None  # the decision whose offer the ad carries (as far as we know)
        self.owner_cpu_permille: int | None = None
        self.suspended = 0  # counters since start
        self.resumed = 0
        self.preempted = 0
        self._executor_gpus = executor.capacity.gpus if executor is not None else ()
        self._lock = trio.Lock()
        self._wake = trio.Event()
        if provider is not None:
            provider.owner_refusal = self.refusal

    # ------------------------------------------------------------------------------------------- policy

    def refusal(self) -> str:
        """Why no new job is taken now ("" when sharing)."""
        d = self.decision
        if d is None:
            return "the owner policy has not decided yet"
        return "" if d.sharing else d.reason

    def reading(self) -> Reading:
        cap = self.probe()
        ours = self.executor.gpus_in_use() if self.executor is not None else set()
        self.owner_cpu_permille = self.load()
        gpus = tuple(
            GpuReading(index=g.index, memory_used_bytes=g.memory_used_bytes,
                       utilization_percent=g.utilization_percent, ours=g.index in ours)
            for g in cap.gpus
        )  # fmt: skip
        return Reading(
            now_ms=self.clock_ms(), owner_cpu_permille=self.owner_cpu_permille, minute_of_week=self.local_minute(),
            cpus=cap.cpus, memory_bytes=cap.memory_bytes, disk_bytes=cap.disk_free_bytes, gpus=gpus,
        )  # fmt: skip

    def shape(self, cap: MachineCapacity) -> MachineCapacity:
        """What the capacity ad says: the offer (the caps, less the GPUs the owner uses), never the raw machine."""
        d = self.decision
        if d is None or not d.sharing:
            return dataclasses.replace(cap, cpus=0, memory_bytes=0, memory_available_bytes=0, disk_bytes=0,
                                       disk_free_bytes=0, gpus=(), gpu_status="not sharing")  # fmt: skip
        o = d.offer
        return dataclasses.replace(
            cap, cpus=o.cpus, memory_bytes=o.memory_bytes, memory_available_bytes=min(cap.memory_available_bytes,
            o.memory_bytes), disk_free_bytes=o.disk_bytes, gpus=tuple(g for g in cap.gpus if g.index in o.gpus),
        )  # fmt: skip

    async def tick(self, *, publish: bool = True) -> Decision:
        """Measure, decide, act; republish the ad if the offer changed. Serialised: one tick at a time."""
        async with self._lock:
            running, suspended = self.executor.job_counts() if self.executor is not None else (0, 0)
            decision = self.governor.decide(self.reading(), running=running, suspended=suspended)
            previous, self.decision = self.decision, decision
            self._apply_caps(decision)
            self._act(decision)
            if previous is None or (previous.sharing, previous.reason) != (decision.sharing, decision.reason):
                self.say(("sharing: " if decision.sharing else "not sharing: ") + decision.reason)
            ad = self._advertised
            if ad is None or ad.sharing != decision.sharing or offer_moved(ad.offer, decision.offer):
                self._advertised = decision
                if publish:  # else the ad is not out yet, and the first one will carry this offer
                    await self.publish()
            return decision

    def _apply_caps(self, d: Decision) -> None:
        caps = self.governor.policy.caps
        if self.provider is not None:
            self.provider.max_concurrent = caps.max_jobs
            self.provider.offered_gpus = d.offer.gpus if d.sharing else ()
        if self.executor is not None:
            gpus = tuple(g for g in self._executor_gpus if not d.sharing or g in d.offer.gpus)
            self.executor.capacity = dataclasses.replace(
                self.executor.capacity, max_concurrent=caps.max_jobs, memory_bytes=caps.memory_bytes or None,
                disk_bytes=caps.disk_bytes or None, gpus=gpus,
            )  # fmt: skip

    def _act(self, d: Decision) -> None:
        if d.action is Action.SUSPEND and self.executor is not None:
            methods = self.executor.suspend_all()
            if methods:
                self.suspended += len(methods)
                self.say(f"suspended {len(methods)} job(s) ({', '.join(sorted(set(methods)))}): {d.reason}")
        elif d.action is Action.RESUME and self.executor is not None:
            n = self.executor.resume_all()
            if n:
                self.resumed += n
                self.say(f"resumed {n} job(s)")
        elif d.action is Action.PREEMPT and self.provider is not None:
            n = self.provider.preempt_all(f"the provider's owner needs the machine ({d.reason})"[:200])
            if n:
                self.preempted += n
                self.say(f"preempted {n} job(s), handed back to their clients: {d.reason}")

    # ------------------------------------------------------------------------------------------- service

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Decide once (before the first ad), then every ``check_seconds`` or when woken by a control call."""
        self.load()  # the CPU sampler needs a first snapshot to measure an interval from
        await self.tick(publish=False)
        task_status.started()
        while True:
            with trio.move_on_after(self.check_seconds):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.tick()

    async def pause(self, *, drain: bool) -> dict[str, Any]:
        self.governor.pause(drain=drain)
        await self.tick()
        return self.api_state()

    async def resume(self) -> dict[str, Any]:
        self.governor.resume()
        await self.tick()
        return self.api_state()

    async def set_policy(self, changes: Mapping[str, object]) -> dict[str, Any]:
        """Apply ``changes`` (validated; raises OwnerPolicyError) and act on them at once. Not written to the
        config file: a restart goes back to ``[owner]``."""
        self.governor.set_policy(policy_with(self.governor.policy, changes))
        await self.tick()
        return self.api_state()

    def policy(self) -> OwnerPolicy:
        return self.governor.policy

    def api_state(self) -> dict[str, Any]:
        d, g = self.decision, self.governor
        running, suspended = self.executor.job_counts() if self.executor is not None else (0, 0)
        load = self.owner_cpu_permille
        return {
            "sharing": bool(d and d.sharing),
            "reason": d.reason if d else "not decided yet",
            "paused": g.paused,
            "drain": g.drain,
            "offer": None if d is None else dataclasses.asdict(d.offer) | {"gpus": list(d.offer.gpus)},
            "owner_gpus": [] if d is None else list(d.owner_gpus),
            "owner_cpu_percent": None if load is None else load / 10,
            "jobs": {"running": running, "suspended": suspended},
            "totals": {"suspended": self.suspended, "resumed": self.resumed, "preempted": self.preempted},
            "check_seconds": self.check_seconds,
            "policy": g.policy.to_plain(),
        }
