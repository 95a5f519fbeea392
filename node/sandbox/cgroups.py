"""Per-job cgroups on v2, v1 or hybrid hierarchies: limits, metering and a reliable kill.

Theory of operation: `probe_cgroups()` finds the daemon's own cgroup in each mounted hierarchy and checks (by
making and removing a child) which it may write. A job gets a child cgroup `coop-<daemon pid>-<n>` in each
usable hierarchy; the job's first process writes itself into every `cgroup.procs` before it execs the sandbox
(see `command.trampoline_argv`), so nothing the job forks escapes. Per function the best source is used:

* memory limit and peak, OOM kills: v2 `memory.*` when the memory controller is delegated, else v1 memory;
* process count: v2 or v1 `pids.max`; CPU bandwidth: v2 `cpu.max` or v1 `cpu.cfs_quota_us`;
* CPU time: v2 `cpu.stat` (present even without the cpu controller), else v1 `cpuacct.usage`;
* kill: v2 `cgroup.kill`, else v1 freezer (freeze, SIGKILL all, thaw), else SIGKILL in a loop;
* suspend (owner policy): v2 `cgroup.freeze`, else the v1 freezer, else the caller stops the job's processes.

All file IO here is small sysfs reads and writes, done inline from the trio loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

import trio

from node.sandbox.spec import Limits

V1_CONTROLLERS: Final = ("memory", "pids", "cpu", "cpuacct", "freezer")
PIDS_OVERHEAD: Final = 4  # the sandbox's own processes (bwrap monitor and pid 1, or the launcher)
CFS_PERIOD_US: Final = 100_000
EMPTY_WAIT_SECONDS: Final = 5.0
_counter = itertools.count(1)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupFacts:
    """Where the daemon may create job cgroups. Paths are the daemon's own cgroup dirs."""

    v2_base: str | None = None  # writable v2 dir (None: no writable v2)
    v2_controllers: tuple[str, ...] = ()  # enabled for children (the base's cgroup.subtree_control)
    v2_available: tuple[str, ...] = ()  # the base's cgroup.controllers
    v2_kill: bool = False  # cgroup.kill (kernel >= 5.14)
    v1_bases: tuple[tuple[str, str], ...] = ()  # (controller, writable dir)
    mounted: tuple[str, ...] = ()  # "v2", "v1" as mounted, writable or not

    @property
    def version(self) -> str:
        m = set(self.mounted)
        return "hybrid" if m == {"v1", "v2"} else "v2" if "v2" in m else "v1" if "v1" in m else "none"

    def v1(self, controller: str) -> str | None:
        return dict(self.v1_bases).get(controller)

    def usable_controllers(self) -> tuple[str, ...]:
        """Functions available to jobs: memory, pids, cpu (bandwidth), cpuacct (metering), kill."""
        out = [c for c in ("memory", "pids", "cpu") if c in self.v2_controllers or self.v1(c)]
        if self.v2_base or self.v1("cpuacct"):
            out.append("cpuacct")
        if self.v2_kill or self.v1("freezer") or out:
            out.append("kill")
        return tuple(out)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller (or "" for v2) -> cgroup path, from the text of /proc/<pid>/cgroup."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        _id, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def parse_mounts(text: str) -> list[tuple[str, str, set[str]]]:
    """(fstype, mount point, options) of each cgroup/cgroup2 mount, from the text of /proc/self/mounts."""
    out = []
    for line in text.splitlines():
        _dev, mnt, fstype, opts, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            out.append((fstype, mnt, set(opts.split(","))))
    return out


def _writable(base: Path) -> bool:
    probe = base / f"coop-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return os.access(base / "cgroup.procs", os.W_OK)


def probe_cgroups() -> CgroupFacts:
    try:
        own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
        mounts = parse_mounts(Path("/proc/self/mounts").read_text())
    except OSError:
        return CgroupFacts()
    mounted: set[str] = set()
    v1: dict[str, str] = {}
    v2_base = None
    available: tuple[str, ...] = ()
    enabled: tuple[str, ...] = ()
    kill = False
    for fstype, mnt, opts in mounts:
        if fstype == "cgroup2":
            mounted.add("v2")
            base = Path(mnt) / own.get("", "/").lstrip("/")
            if v2_base is None and _writable(base):
                v2_base = str(base)
                available = tuple((base / "cgroup.controllers").read_text().split())
                enabled = tuple((base / "cgroup.subtree_control").read_text().split())
                kill = (base / "cgroup.kill").exists() or base == Path(mnt)
        else:
            mounted.add("v1")
            for c in V1_CONTROLLERS:
                if c in opts and c not in v1 and c in own:
                    base = Path(mnt) / own[c].lstrip("/")
                    if _writable(base):
                        v1[c] = str(base)
    return CgroupFacts(
        v2_base=v2_base,
        v2_controllers=enabled,
        v2_available=available,
        v2_kill=kill,
        v1_bases=tuple(sorted(v1.items())),
        mounted=tuple(sorted(mounted)),
    )


def enable_v2_controllers(facts: CgroupFacts) -> CgroupFacts:
    """Try to enable memory/pids/cpu for children of the daemon's v2 cgroup (fails if it has processes)."""
    if facts.v2_base is None:
        return facts
    want = [c for c in ("memory", "pids", "cpu") if c in facts.v2_available and c not in facts.v2_controllers]
    control = Path(facts.v2_base) / "cgroup.subtree_control"
    for c in want:
        with contextlib.suppress(OSError):
            control.write_text(f"+{c}")
    enabled = tuple(control.read_text().split())
    return CgroupFacts(
        v2_base=facts.v2_base, v2_controllers=enabled, v2_available=facts.v2_available, v2_kill=facts.v2_kill,
        v1_bases=facts.v1_bases, mounted=facts.mounted,
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(facts: CgroupFacts) -> list[str]:
    """Kill and remove job cgroups left behind by a daemon that died (`coop-<pid>-<n>` whose pid is gone).

    Returns:
        The cgroup dirs removed. One still busy (its processes are dying) is left for the next sweep.
    """
    removed = []
    bases = [b for _c, b in facts.v1_bases] + ([facts.v2_base] if facts.v2_base else [])
    for base in bases:
        with contextlib.suppress(OSError):
            for d in Path(base).iterdir():
                parts = d.name.split("-")
                if len(parts) != 3 or parts[0] != "coop" or not parts[1].isdigit() or _alive(int(parts[1])):
                    continue
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
                    d.rmdir()
                    removed.append(str(d))
    return removed


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupStats:
    cpu_seconds: float | None
    peak_memory_bytes: int | None
    oom_kills: int


class JobCgroup:
    """The cgroups of one job. Create with `JobCgroup.create`, always `await remove()` afterwards."""

    def __init__(self, facts: CgroupFacts, name: str) -> None:
        self._facts = facts
        self._dirs: dict[str, Path] = {}  # function or "v2" -> dir
        self.name = name

    @classmethod
    def create(cls, facts: CgroupFacts, limits: Limits) -> JobCgroup:
        """Make the job's cgroups and write its limits.

        Raises:
            OSError: if a cgroup cannot be made or configured (the job must then not run).
        """
        cg = cls(facts, f"coop-{os.getpid()}-{next(_counter)}")
        try:
            cg._setup(limits)
        except OSError:
            for d in cg._dirs.values():
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return cg

    def _mk(self, key: str, base: str) -> Path:
        d = Path(base) / self.name
        d.mkdir()
        self._dirs[key] = d
        return d

    def _setup(self, limits: Limits) -> None:
        f = self._facts
        pids_max = str(limits.max_processes + PIDS_OVERHEAD)
        quota = max(1000, int(limits.cpu_cores * CFS_PERIOD_US))
        if f.v2_base:
            d = self._mk("v2", f.v2_base)
            if "memory" in f.v2_controllers:
                (d / "memory.max").write_text(str(limits.memory_bytes))
                with contextlib.suppress(OSError):
                    (d / "memory.swap.max").write_text("0")
            if "pids" in f.v2_controllers:
                (d / "pids.max").write_text(pids_max)
            if "cpu" in f.v2_controllers:
                (d / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        if "memory" not in f.v2_controllers and (base := f.v1("memory")):
            d = self._mk("memory", base)
            (d / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                (d / "memory.swappiness").write_text("0")
        if "pids" not in f.v2_controllers and (base := f.v1("pids")):
            (self._mk("pids", base) / "pids.max").write_text(pids_max)
        if "cpu" not in f.v2_controllers and (base := f.v1("cpu")):
            d = self._mk("cpu", base)
            (d / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        if not f.v2_base and (base := f.v1("cpuacct")):
            self._mk("cpuacct", base)
        if not f.v2_kill and (base := f.v1("freezer")):
            self._mk("freezer", base)

    @property
    def procs_files(self) -> tuple[str, ...]:
        """Every `cgroup.procs` the job's first process must join."""
        return tuple(str(d / "cgroup.procs") for d in self._dirs.values())

    def pids(self) -> list[int]:
        for d in self._dirs.values():
            with contextlib.suppress(OSError):
                return [int(p) for p in (d / "cgroup.procs").read_text().split()]
        return []

    def cpu_seconds(self) -> float | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if "v2" in self._dirs:
                stat = dict(line.split() for line in (self._dirs["v2"] / "cpu.stat").read_text().splitlines())
                return int(stat["usage_usec"]) / 1e6
            if "cpuacct" in self._dirs:
                return int((self._dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        return None

    def stats(self) -> CgroupStats:
        peak, ooms = None, 0
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self._facts.v2_controllers and "v2" in self._dirs:
                d = self._dirs["v2"]
                events = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
                ooms = int(events.get("oom_kill", 0))
                peak = int((d / "memory.peak").read_text())
            elif "memory" in self._dirs:
                d = self._dirs["memory"]
                control = dict(line.split() for line in (d / "memory.oom_control").read_text().splitlines())
                ooms = int(control.get("oom_kill", 0))
                peak = int((d / "memory.max_usage_in_bytes").read_text())
        return CgroupStats(cpu_seconds=self.cpu_seconds(), peak_memory_bytes=peak, oom_kills=ooms)

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL everything in the job's cgroups (no waiting)."""
        if self._facts.v2_kill and "v2" in self._dirs:
            with contextlib.suppress(OSError):
                (self._dirs["v2"] / "cgroup.kill").write_text("1")
                return
        freezer = self._dirs.get("freezer")
        if freezer is not None:
            with contextlib.suppress(OSError):
                (freezer / "freezer.state").write_text("FROZEN")
            self.signal_all(signal.SIGKILL)  # a frozen fork bomb cannot fork between listing and killing
            with contextlib.suppress(OSError):
                (freezer / "freezer.state").write_text("THAWED")
            return
        self.signal_all(signal.SIGKILL)

    def freeze(self, frozen: bool) -> bool:
        """Freeze (or thaw) every process of the job: v2 `cgroup.freeze`, else the v1 freezer.

        Returns:
            False if neither is available or writable here (the caller falls back to SIGSTOP/SIGCONT).
        """
        v2 = self._dirs.get("v2")
        with contextlib.suppress(OSError):
            if v2 is not None and (v2 / "cgroup.freeze").exists():
                (v2 / "cgroup.freeze").write_text("1" if frozen else "0")
                return True
        freezer = self._dirs.get("freezer")
        with contextlib.suppress(OSError):
            if freezer is not None:
                (freezer / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
                return True
        return False

    async def remove(self) -> None:
        """Kill what is left, wait until the cgroups are empty, remove them."""
        with trio.move_on_after(EMPTY_WAIT_SECONDS):
            while self.pids():
                self.kill()
                await trio.sleep(0.005)
        for d in self._dirs.values():
            with contextlib.suppress(OSError):
                d.rmdir()
