"""The trio executor: admits a job, runs it in the chosen tier, enforces what the kernel cannot, meters it.

Theory of operation (rules):

* Jobs are forked in the trio thread itself (`spawn.spawn`): PDEATHSIG and bwrap's --die-with-parent fire when
  the *forking thread* exits, and `trio.lowlevel.open_process` forks in a worker thread that trio retires after
  10 s idle, which killed jobs about 10 s in.
* The kernel enforces CPU (RLIMIT_CPU), file size, open files, processes, memory (cgroup, else RLIMIT_AS) and
  isolation. The daemon enforces the wall clock, the output cap, total CPU across processes and total disk use,
  by polling, and cancellation through a trio cancel scope.
* Killing: tier A SIGKILLs the outer bwrap, which takes the job's whole PID namespace with it; tier B asks the
  launcher to sweep its descendants. Where a cgroup exists it is killed too and `run` returns only once it is
  empty; without one, `run` waits until the sandbox's pid 1 has gone (which implies the namespace is empty).
* The termination reason comes from facts (`policy.classify`): who killed it and why, OOM kill counters,
  the fatal signal, the work dir's size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, final

import trio

from node.sandbox import command, workdir
from node.sandbox.cgroups import JobCgroup, enable_v2_controllers, sweep_stale
from node.sandbox.detect import HostFacts, TierDecision, choose_tier
from node.sandbox.errors import AdmissionRefused, SandboxUnavailable
from node.sandbox.job import RunningJob, SpawnFds
from node.sandbox.policy import Capacity, JobFacts, admit, classify
from node.sandbox.seccomp import build_filter
from node.sandbox.spawn import spawn
from node.sandbox.spec import ExecResult, ExecSpec, Termination, Tier, Usage

log = logging.getLogger(__name__)

OnOutput = Callable[[str, bytes], Awaitable[None]]  # ("stdout" | "stderr", chunk)
READ_CHUNK_BYTES: Final = 64 * 1024
POLL_SECONDS: Final = 0.05  # CPU and memory checks
DISK_POLL_SECONDS: Final = 0.25
DRAIN_SECONDS: Final = 2.0  # after the job's exit, for pipes still held by dying processes
REAP_SECONDS: Final = 5.0  # after SIGKILL, for the sandbox to disappear
STATUS_MAX_BYTES: Final = 64 * 1024


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorStatistics:
    running: int
    started: int
    refused: int


class Executor:
    """Runs jobs in the strongest sandbox tier the host supports.

    Args:
        facts: from `doctor.collect_facts()` (or simulated, in tests).
        max_concurrent, memory_bytes, disk_bytes, gpus: the node's caps for jobs running at once
            (`gpus` defaults to every GPU NVML reported).
        allow_unsandboxed: run native jobs without a sandbox where no tier is available (loudly).
        tier: insist on one tier (tests, `node run-local --tier`); otherwise the strongest is chosen.
    """

    def __init__(
        self,
        *,
        facts: HostFacts,
        max_concurrent: int = 1,
        memory_bytes: int | None = None,
        disk_bytes: int | None = None,
        gpus: tuple[int, ...] | None = None,
        allow_unsandboxed: bool = False,
        tier: Tier | None = None,
    ) -> None:
        self.facts = facts
        self.cgroups = enable_v2_controllers(facts.cgroups) if facts.cgroups.v2_base else facts.cgroups
        for stale in sweep_stale(self.cgroups):
            log.warning("removed a job cgroup left by a daemon that died: %s", stale)
        self.decision: TierDecision = choose_tier(facts, allow_unsandboxed=allow_unsandboxed, want=tier)
        self.capacity = Capacity(
            max_concurrent=max_concurrent,
            memory_bytes=memory_bytes,
            disk_bytes=disk_bytes,
            gpus=tuple(g.index for g in facts.gpus) if gpus is None else gpus,
        )
        self._seccomp = build_filter(facts.machine) if self.decision.tier is Tier.BWRAP else b""
        self._running: list[ExecSpec] = []
        self._jobs: list[RunningJob] = []  # spawned and not yet reaped: what suspend/resume act on
        self._finished_cpu = 0.0  # CPU seconds of reaped jobs, so `jobs_cpu_seconds` never goes backwards
        self._started = 0
        self._refused = 0
        if self.decision.tier is Tier.UNSANDBOXED:
            log.warning("!!! %s: a job can read and write everything this user can !!!", self.decision.reason)

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(running=len(self._running), started=self._started, refused=self._refused)

    # Owner control: the owner policy (node/owner.py) suspends jobs while the owner needs the machine.

    def suspend_all(self) -> list[str]:
        """Suspend every running job; returns how each newly suspended one was frozen ("cgroup"/"sigstop")."""
        return [m for job in self._jobs if job.suspended_at is None and (m := job.suspend())]

    def resume_all(self) -> int:
        """Resume every suspended job; returns how many were resumed."""
        return sum(job.resume() for job in self._jobs)

    def job_counts(self) -> tuple[int, int]:
        """(running and not suspended, suspended): admitted jobs not yet spawned count as running."""
        suspended = sum(job.suspended_at is not None for job in self._jobs)
        return len(self._running) - suspended, suspended

    def gpus_in_use(self) -> set[int]:
        return {g for spec in self._running for g in spec.gpus}

    def jobs_cpu_seconds(self) -> float:
        """CPU seconds used by every job this executor ran, monotonic (to take our jobs out of the owner's load)."""
        return self._finished_cpu + sum(job.cpu_seconds() for job in self._jobs)

    async def run(
        self, spec: ExecSpec, *, on_output: OnOutput | None = None, cancel_scope: trio.CancelScope | None = None
    ) -> ExecResult:
        """Run one job to the end and report how it went.

        Args:
            spec: the job.
            on_output: awaited with each chunk of stdout/stderr as it arrives (within the output cap).
            cancel_scope: cancel it to stop the job; the result then says `cancelled`. (Cancelling an
                enclosing scope instead kills the job too, and Cancelled propagates as usual.)

        Raises:
            SandboxUnavailable: no tier is available here (the message says how to fix that).
            AdmissionRefused: the node is at its caps, or the job asks for more than it offers.
            WorkDirError: the work dir exists, or the job uid cannot reach it.
        """
        if self.decision.tier is None:
            self._refused += 1
            raise SandboxUnavailable(self.decision.reason)
        verdict = admit(self.capacity, self._running, spec)
        if not verdict.admitted:
            self._refused += 1
            raise AdmissionRefused(code=verdict.code, reason=verdict.reason, retryable=verdict.retryable)
        self._running.append(spec)
        self._started += 1
        try:
            return await self._run(spec, self.decision.tier, on_output, cancel_scope or trio.CancelScope())
        finally:
            self._running.remove(spec)

    async def _run(self, spec: ExecSpec, tier: Tier, on_output: OnOutput | None, scope: trio.CancelScope) -> ExecResult:
        f = self.facts
        uid, gid = f.job_uid, f.job_gid
        await trio.to_thread.run_sync(lambda: workdir.prepare(spec, uid=uid, gid=gid))
        cgroup = None
        if self.cgroups.usable_controllers():
            try:
                cgroup = JobCgroup.create(self.cgroups, spec.limits)
            except OSError as exc:
                return self._setup_failed(spec, tier, f"cannot create the job's cgroup: {exc}")
        try:
            return await self._spawn_and_wait(spec, tier, cgroup, on_output, scope)
        finally:
            if cgroup is not None:
                with trio.CancelScope(shield=True):
                    await cgroup.remove()

    def _argv(self, spec: ExecSpec, tier: Tier, cgroup: JobCgroup | None, fds: SpawnFds) -> tuple[list[str], bytes]:
        f = self.facts
        has_memcg = cgroup is not None and "memory" in self.cgroups.usable_controllers()
        limits = command.rlimits(spec.limits, cap_address_space=not has_memcg and not spec.gpus)
        devices, gpu_env = command.gpu_plan(spec.gpus, f.gpus)
        procs = cgroup.procs_files if cgroup is not None else ()
        if tier is Tier.BWRAP:
            assert f.bwrap.path is not None
            assert f.prlimit is not None
            inner, private = command.bwrap_argv(
                spec, bwrap=f.bwrap.path, bwrap_version=f.bwrap.version, layout=f.layout, prlimit=f.prlimit,
                limits=limits, seccomp_fd=fds.seccomp, status_fd=fds.status_w, args_fd=fds.private, devices=devices,
                extra_env=gpu_env,
            )  # fmt: skip
            drop = command.drop_argv(f.setpriv, f.job_uid, f.job_gid) if f.uid != f.job_uid else []
            return command.trampoline_argv(procs, [*drop, *inner]), private
        return command.launcher_argv(
            spec, python=f.python, parent_pid=os.getpid(), status_fd=fds.status_w, config_fd=fds.private,
            uid=f.job_uid if f.uid != f.job_uid else None, gid=f.job_gid if f.uid != f.job_uid else None,
            limits=limits, cgroup_procs=procs, landlock_abi=f.landlock_abi, sandboxed=tier is Tier.LANDLOCK,
            layout=f.layout, devices=devices, extra_env=gpu_env,
        )  # fmt: skip

    async def _spawn_and_wait(
        self, spec: ExecSpec, tier: Tier, cgroup: JobCgroup | None, on_output: OnOutput | None, scope: trio.CancelScope
    ) -> ExecResult:
        fds = SpawnFds(self._seccomp)
        try:
            argv, private = self._argv(spec, tier, cgroup, fds)
            fds.fill_private(private)
            proc = spawn(
                argv, pass_fds=fds.for_child(tier), start_new_session=True, env={"PATH": command.BASE_PATH}, cwd="/"
            )
        except OSError as exc:
            os.close(fds.status_r)
            return self._setup_failed(spec, tier, f"cannot start the sandbox: {exc}")
        finally:
            fds.close_child_ends()
        status_r = fds.status_r
        job = RunningJob(spec, tier, proc, cgroup)
        self._jobs.append(job)
        status_stream = trio.lowlevel.FdStream(status_r)
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, job, proc.stdout, "stdout", on_output)
                    nursery.start_soon(self._pump, job, proc.stderr, "stderr", on_output)
                    nursery.start_soon(self._read_status, job, status_stream)
                    nursery.start_soon(self._watch, job)
                    await proc.wait()
                    job.t_end = trio.current_time()
                    job.exited.set()
                    if cgroup is not None:
                        cgroup.kill()  # anything the sandbox left behind
                    with trio.move_on_after(DRAIN_SECONDS):
                        await job.readers_done.wait()
                    nursery.cancel_scope.cancel()
            if scope.cancelled_caught and not job.exited.is_set():
                job.kill(Termination.CANCELLED, "cancelled by the daemon")
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    job.kill(None)
                    with trio.move_on_after(REAP_SECONDS):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()  # the launcher did not exit in time: cgroups, if any, catch the rest
                        await proc.wait()
                if job.t_end is None:
                    job.t_end = trio.current_time()
                await self._wait_pid1_gone(job)
                self._jobs.remove(job)
                self._finished_cpu += job.cpu_seconds()
                await status_stream.aclose()
                await proc.aclose()
        return await self._result(job)

    async def _pump(
        self, job: RunningJob, stream: trio.abc.ReceiveStream, name: str, on_output: OnOutput | None
    ) -> None:
        cap = job.spec.limits.output_bytes
        try:
            while chunk := await stream.receive_some(READ_CHUNK_BYTES):
                room = cap - job.out_total
                keep = chunk[: max(room, 0)]
                job.out_total += len(chunk)
                if keep:
                    job.out[name] += keep
                    if on_output is not None:
                        await on_output(name, keep)
                if job.out_total > cap:
                    job.kill(Termination.OUTPUT_LIMIT, f"stdout + stderr passed the {cap}-byte cap")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            job.reader_done()

    async def _read_status(self, job: RunningJob, stream: trio.lowlevel.FdStream) -> None:
        data = b""
        try:
            while (chunk := await stream.receive_some(4096)) and len(data) < STATUS_MAX_BYTES:
                data += chunk
                if job.tier is Tier.BWRAP and job.pid1 is None:
                    job.note_pid1(data)
        finally:
            job.reader_done()
        decoder = json.JSONDecoder()
        text = data.decode(errors="replace").strip()
        while text:
            try:
                obj, end = decoder.raw_decode(text)
            except ValueError:
                break
            if isinstance(obj, dict):
                job.status.update(obj)
            text = text[end:].strip()

    async def _wait_pid1_gone(self, job: RunningJob) -> None:
        """pid 1 of a PID namespace exits only after every process in it is gone."""
        if job.pid1_fd is None:
            return
        with trio.move_on_after(REAP_SECONDS):
            await trio.lowlevel.wait_readable(job.pid1_fd)
        trio.lowlevel.notify_closing(job.pid1_fd)
        os.close(job.pid1_fd)
        job.pid1_fd = None

    async def _watch(self, job: RunningJob) -> None:
        """Enforce the daemon's limits; once the job is being killed (by anyone), make sure it dies."""
        await self._watch_limits(job)
        with trio.move_on_after(REAP_SECONDS):
            await job.exited.wait()
        if not job.exited.is_set() and job.proc.returncode is None:
            log.warning("sandbox %s did not exit after being killed; SIGKILL", job.proc.pid)
            job.proc.kill()

    async def _watch_limits(self, job: RunningJob) -> None:
        limits = job.spec.limits
        next_disk = job.t0 + DISK_POLL_SECONDS
        while job.killed_for is None:
            now = trio.current_time()
            deadline = job.t0 + limits.wall_seconds + job.paused_seconds(now)  # time suspended does not count
            if now >= deadline:
                await self._timeout(job)
                return
            cpu = job.cgroup.cpu_seconds() if job.cgroup is not None else None
            if cpu is None:
                job.sample()
                cpu = job.sampled_cpu
                if job.cgroup is None and job.sampled_rss > limits.memory_bytes:
                    job.kill(Termination.MEMORY_LIMIT, f"the job's processes held {job.sampled_rss} bytes")
                    return
            if cpu > limits.cpu_seconds:
                job.kill(Termination.CPU_LIMIT, f"the job used {cpu:.2f} s of CPU, the limit is {limits.cpu_seconds}")
                return
            if now >= next_disk:
                used = await trio.to_thread.run_sync(workdir.disk_usage, job.spec.work_dir, abandon_on_cancel=True)
                if used > limits.disk_bytes:
                    detail = f"the work dir grew to {used} bytes, the cap is {limits.disk_bytes}"
                    job.kill(Termination.DISK_LIMIT, detail)
                    return
                next_disk = trio.current_time() + DISK_POLL_SECONDS
            await trio.sleep(max(0.0, min(POLL_SECONDS, deadline - trio.current_time())))

    async def _timeout(self, job: RunningJob) -> None:
        """SIGTERM the job's processes, give them `kill_grace_seconds`, then kill everything."""
        limits = job.spec.limits
        if job.exited.is_set():
            return
        job.killed_for = Termination.WALL_TIMEOUT
        job.kill_detail = f"still running after {limits.wall_seconds} s (wall clock)"
        if limits.kill_grace_seconds > 0:
            if job.tier is Tier.BWRAP:
                for pid in job.job_pids():  # not bwrap itself: SIGTERM to it would kill the namespace at once
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
            else:
                job.proc.send_signal(signal.SIGTERM)  # the launcher passes it on to every descendant
            with trio.move_on_after(limits.kill_grace_seconds):
                await job.exited.wait()
        job.kill(None)

    async def _result(self, job: RunningJob) -> ExecResult:
        spec, st = job.spec, job.status
        stats = job.cgroup.stats() if job.cgroup is not None else None
        if job.tier is Tier.BWRAP:
            started = "exit-code" in st
            exit_status = st.get("exit-code") if started else None
        else:
            started = bool(st.get("exec_ok"))
            exit_status = st.get("exit_code") if started else None
        if job.killed_for is not None:
            exit_status = None
        # Metering, best source first: the cgroup, then the tier B launcher's rusage, then sampling.
        launcher_cpu, launcher_rss = st.get("cpu_seconds"), st.get("max_rss")
        cpu = stats.cpu_seconds if stats is not None else None
        if cpu is None:
            cpu = max(job.sampled_cpu, launcher_cpu if isinstance(launcher_cpu, float) else 0.0)
        peak = stats.peak_memory_bytes if stats is not None else None
        if peak is None:
            peak = max(job.sampled_rss, launcher_rss if isinstance(launcher_rss, int) else 0)
        used, (outputs, missing) = await trio.to_thread.run_sync(
            lambda: (workdir.disk_usage(spec.work_dir), workdir.collect_outputs(spec.work_dir, spec.outputs))
        )
        stderr_tail = bytes(job.out["stderr"][-300:]).decode(errors="replace").strip()
        termination, detail = classify(
            JobFacts(
                killed_for=job.killed_for, kill_detail=job.kill_detail, started=started,
                setup_error=str(st.get("error") or stderr_tail or f"sandbox exited with {job.proc.returncode}"),
                exit_status=exit_status if isinstance(exit_status, int) else None,
                oom_kills=stats.oom_kills if stats else 0, cpu_seconds=cpu, cpu_limit=spec.limits.cpu_seconds,
                disk_used=used, disk_limit=spec.limits.disk_bytes,
            )
        )  # fmt: skip
        end = job.t_end or trio.current_time()
        wall = end - job.t0 - job.paused_seconds(end)
        if job.tier is Tier.UNSANDBOXED:
            detail = f"UNSANDBOXED: {detail}"
        return ExecResult(
            termination=termination,
            exit_status=exit_status if isinstance(exit_status, int) else None,
            outputs=outputs,
            missing_outputs=missing,
            stdout=bytes(job.out["stdout"]),
            stderr=bytes(job.out["stderr"]),
            usage=Usage(cpu_seconds=cpu, wall_seconds=wall, peak_memory_bytes=peak, gpu_seconds=wall * len(spec.gpus)),
            tier=job.tier,
            detail=detail,
        )

    def _setup_failed(self, spec: ExecSpec, tier: Tier, detail: str) -> ExecResult:
        log.error("sandbox setup failed: %s", detail)
        return ExecResult(
            termination=Termination.SANDBOX_ERROR, exit_status=None, outputs=(), missing_outputs=spec.outputs,
            stdout=b"", stderr=b"", usage=Usage(cpu_seconds=0.0, wall_seconds=0.0, peak_memory_bytes=0),
            tier=tier, detail=detail,
        )  # fmt: skip
