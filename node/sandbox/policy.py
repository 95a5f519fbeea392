"""Pure sandbox policy: admission of jobs against the node's caps, and the verdict on how a job ended.

Both are decisions with reasons, never bare bools: "why was my job refused" and "why was it killed" always have
an answer.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

from node.sandbox.spec import ExecSpec, Termination


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    """What the node owner lets jobs use at once. None: no cap beyond each job's own limits."""

    max_concurrent: int = 1
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    gpus: tuple[int, ...] = ()  # GPU indices jobs may be granted

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    admitted: bool
    code: str  # safe to send to the peer
    reason: str
    retryable: bool = False


def admit(capacity: Capacity, running: Sequence[ExecSpec], spec: ExecSpec) -> Admission:
    """Whether `spec` may start now next to `running`."""
    unknown = sorted(set(spec.gpus) - set(capacity.gpus))
    if unknown:
        return Admission(admitted=False, code="gpu-unavailable", reason=f"this node does not offer GPU(s) {unknown}")
    for name, cap in (("memory", capacity.memory_bytes), ("disk", capacity.disk_bytes)):
        if cap is None:
            continue
        want = getattr(spec.limits, f"{name}_bytes")
        if want > cap:
            return Admission(
                admitted=False,
                code=f"{name}-too-large",
                reason=f"job asks for {want} bytes of {name}, node offers {cap}",
            )
        used = sum(getattr(r.limits, f"{name}_bytes") for r in running)
        if used + want > cap:
            return Admission(
                admitted=False, code=f"{name}-busy", retryable=True,
                reason=f"{name}: {used} of {cap} bytes committed to running jobs, job asks for {want}",
            )  # fmt: skip
    if len(running) >= capacity.max_concurrent:
        return Admission(
            admitted=False, code="busy", retryable=True,
            reason=f"{len(running)} job(s) running, the node takes at most {capacity.max_concurrent}",
        )  # fmt: skip
    busy = sorted(set(spec.gpus) & {g for r in running for g in r.gpus})
    if busy:
        return Admission(admitted=False, code="gpu-busy", retryable=True, reason=f"GPU(s) {busy} are in use")
    return Admission(admitted=True, code="ok", reason="admitted")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class JobFacts:
    """What the executor observed about a finished job."""

    killed_for: Termination | None  # the daemon killed it for this (the first reason wins)
    kill_detail: str = ""
    started: bool  # the sandbox reported that it ran the command
    setup_error: str = ""
    exit_status: int | None  # 128 + N for signal N
    oom_kills: int = 0
    cpu_seconds: float = 0.0
    cpu_limit: float
    disk_used: int = 0
    disk_limit: int


def classify(f: JobFacts) -> tuple[Termination, str]:
    """The termination reason and the fact behind it."""
    if f.killed_for is not None:
        return f.killed_for, f.kill_detail or f"killed by the daemon: {f.killed_for}"
    if not f.started:
        return Termination.SANDBOX_ERROR, f"the sandbox did not start the command: {f.setup_error or 'unknown'}"
    if f.oom_kills:
        return Termination.MEMORY_LIMIT, f"the cgroup OOM killer killed {f.oom_kills} process(es)"
    status = f.exit_status
    sig = status - 128 if status is not None and status > 128 else None
    if sig == signal.SIGXCPU:
        return Termination.CPU_LIMIT, "killed by SIGXCPU (RLIMIT_CPU soft limit)"
    if sig == signal.SIGKILL and f.cpu_seconds >= f.cpu_limit:
        return Termination.CPU_LIMIT, f"killed by SIGKILL after {f.cpu_seconds:.2f} s CPU (RLIMIT_CPU hard limit)"
    if sig == signal.SIGXFSZ:
        return Termination.DISK_LIMIT, "killed by SIGXFSZ (RLIMIT_FSIZE)"
    if f.disk_used >= f.disk_limit:
        return Termination.DISK_LIMIT, f"the work dir holds {f.disk_used} bytes, the cap is {f.disk_limit}"
    if sig is not None:
        return Termination.EXITED, f"killed by signal {sig}"
    return Termination.EXITED, f"exited with status {status}"
