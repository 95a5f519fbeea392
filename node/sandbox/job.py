"""One running job's state and descriptors: mechanism shared by the executor's tasks (no policy here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import psutil
import trio

from node.sandbox.cgroups import JobCgroup
from node.sandbox.spawn import Child
from node.sandbox.spec import ExecSpec, Termination, Tier


class RunningJob:
    """The state of one running job, shared by the executor's tasks."""

    def __init__(self, spec: ExecSpec, tier: Tier, proc: Child, cgroup: JobCgroup | None) -> None:
        self.spec = spec
        self.tier = tier
        self.proc = proc
        self.cgroup = cgroup
        self.t0 = trio.current_time()
        self.t_end: float | None = None
        self.killed_for: Termination | None = None
        self.kill_detail = ""
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.out_total = 0
        self.status: dict[str, object] = {}
        self.pid1: int | None = None  # tier A: the sandbox's pid 1 (inner bwrap), host pid
        self.pid1_fd: int | None = None
        self.sampled_cpu = 0.0
        self.sampled_rss = 0
        self.readers_left = 3
        self.readers_done = trio.Event()
        self.exited = trio.Event()
        self.suspended_at: float | None = None  # trio time; set while the owner has the job suspended
        self.suspended_total = 0.0
        self.suspend_method = ""  # "cgroup" (freezer) or "sigstop"
        self._stopped: set[int] = set()

    def reader_done(self) -> None:
        self.readers_left -= 1
        if self.readers_left == 0:
            self.readers_done.set()

    def kill(self, reason: Termination | None, detail: str = "") -> None:
        """SIGKILL the whole job now; remember why (the first reason wins). Never waits."""
        if reason is not None and self.killed_for is None and not self.exited.is_set():
            self.killed_for, self.kill_detail = reason, detail
        if self.suspended_at is not None:
            self.resume()  # a stopped launcher could not act on SIGUSR1; SIGKILL follows at once anyway
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.tier is Tier.BWRAP:
                    self.proc.kill()  # the PID namespace dies with it
                else:
                    self.proc.send_signal(signal.SIGUSR1)  # the launcher sweeps, reports, exits

    def paused_seconds(self, now: float) -> float:
        """Time spent suspended so far: not charged, and not counted against the wall-clock limit."""
        return self.suspended_total + (now - self.suspended_at if self.suspended_at is not None else 0.0)

    def _tree(self) -> list[int]:
        root = self.pid1 if self.tier is Tier.BWRAP else self.proc.pid
        if root is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
        return []

    def suspend(self) -> str:
        """Freeze the job (cgroup freezer where writable, else SIGSTOP of every process in its tree).

        Returns:
            How it was done ("cgroup" or "sigstop"), or "" if it is not running (exited or being killed).
        """
        if self.suspended_at is not None:
            return self.suspend_method
        if self.exited.is_set() or self.killed_for is not None:
            return ""
        if self.cgroup is not None and self.cgroup.freeze(True):
            self.suspend_method = "cgroup"
        else:
            # Stop parents before children, and list again until nothing new appears: a process that forked
            # between listing and stopping has its child caught by the next pass.
            for _ in range(5):
                fresh = [pid for pid in self._tree() if pid not in self._stopped]
                if not fresh:
                    break
                for pid in fresh:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGSTOP)
                    self._stopped.add(pid)
            self.suspend_method = "sigstop"
        self.suspended_at = trio.current_time()
        return self.suspend_method

    def resume(self) -> bool:
        """Thaw a suspended job. Returns False if it was not suspended."""
        if self.suspended_at is None:
            return False
        if self.suspend_method == "cgroup" and self.cgroup is not None:
            self.cgroup.freeze(False)
        else:
            for pid in [*self._stopped, *self._tree()]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)
            self._stopped.clear()
        self.suspended_total += trio.current_time() - self.suspended_at
        self.suspended_at = None
        return True

    def cpu_seconds(self) -> float:
        """CPU used so far by the job's processes (cgroup, else sampling)."""
        cpu = self.cgroup.cpu_seconds() if self.cgroup is not None else None
        if cpu is None:
            self.sample()
            cpu = self.sampled_cpu
        return cpu

    def job_pids(self) -> list[int]:
        root = self.pid1 if self.tier is Tier.BWRAP else self.proc.pid
        if root is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(root).children(recursive=True)]
        return []

    def note_pid1(self, data: bytes) -> None:
        line = data.split(b"\n", 1)[0]
        with contextlib.suppress(ValueError):
            pid = json.loads(line).get("child-pid")
            if isinstance(pid, int):
                self.pid1 = pid
                with contextlib.suppress(OSError):
                    self.pid1_fd = os.pidfd_open(pid)

    def sample(self) -> None:
        """Fallback metering without a cgroup: sum CPU (with reaped children) and RSS over the job's tree."""
        cpu, rss = 0.0, 0
        root = self.pid1 if self.tier is Tier.BWRAP else self.proc.pid
        if root is None:
            return
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                    rss += p.memory_info().rss
        self.sampled_cpu = max(self.sampled_cpu, cpu)
        self.sampled_rss = max(self.sampled_rss, rss)


class SpawnFds:
    """The descriptors a sandbox start needs: status pipe, seccomp program, private args (all memfds read once)."""

    def __init__(self, seccomp: bytes) -> None:
        self.status_r, self.status_w = os.pipe()
        self.seccomp = self._memfd("coop-seccomp", seccomp)
        self.private = os.memfd_create("coop-args")

    @staticmethod
    def _memfd(name: str, data: bytes) -> int:
        fd = os.memfd_create(name)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def fill_private(self, data: bytes) -> None:
        os.write(self.private, data)
        os.lseek(self.private, 0, os.SEEK_SET)

    def for_child(self, tier: Tier) -> tuple[int, ...]:
        if tier is Tier.BWRAP:
            return (self.status_w, self.seccomp, self.private)
        return (self.status_w, self.private)

    def close_child_ends(self) -> None:
        for fd in (self.status_w, self.seccomp, self.private):
            os.close(fd)
