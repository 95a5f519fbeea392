"""What a job asks for and what it gets back: frozen data, no IO.

A provider turns an agreed job into an `ExecSpec`, hands it to the `Executor` and gets an `ExecResult`. Every
field here is plain data so that policy (admission, termination verdicts, argv building) can be tested without
running anything.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Final, final

MIB: Final = 1 << 20
MAX_NAME_BYTES: Final = 255  # one path component, as most filesystems allow
MAX_PATH_BYTES: Final = 1024  # a relative input/output name


class Termination(enum.StrEnum):
    """Why a job stopped. The string values go on the wire in job results."""

    EXITED = "exited"  # the job ended on its own (any exit status)
    CPU_LIMIT = "cpu-limit"
    MEMORY_LIMIT = "memory-limit"
    WALL_TIMEOUT = "wall-timeout"
    OUTPUT_LIMIT = "output-limit"  # stdout + stderr passed their cap
    DISK_LIMIT = "disk-limit"
    CANCELLED = "cancelled"
    SANDBOX_ERROR = "sandbox-error"  # the sandbox could not be set up: not the job's fault


class Tier(enum.StrEnum):
    """How a native job is isolated. See `detect.choose_tier`."""

    BWRAP = "bwrap"  # tier A: namespaces (bubblewrap) + seccomp + rlimits + cgroups
    LANDLOCK = "landlock"  # tier B: Landlock + seccomp + rlimits + subreaper sweep
    UNSANDBOXED = "unsandboxed"  # rlimits, cgroups and the sweep only: trusted single-user setups


def check_relative_name(name: str) -> str:
    """Validate a job-supplied file name: relative, no `..`, no empty or odd components.

    Returns:
        The name unchanged.

    Raises:
        ValueError: if the name could escape the work dir or is unreasonable.
    """
    if not name or "\0" in name or len(name.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"bad file name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or str(path) != name:
        raise ValueError(f"file name must be relative and normalised: {name!r}")
    for part in path.parts:
        if part in (".", "..") or len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"bad component {part!r} in file name {name!r}")
    return name


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Resource limits for one job. All are enforced; see docs in `executor` for how."""

    cpu_seconds: float = 60.0  # total CPU time of the whole job (all processes)
    wall_seconds: float = 300.0
    memory_bytes: int = 512 * MIB
    disk_bytes: int = 1024 * MIB  # work dir (and private /tmp) together
    output_bytes: int = 1 * MIB  # stdout + stderr together
    max_processes: int = 64
    open_files: int = 256
    cpu_cores: float = 1.0  # cgroup CPU bandwidth, where a cgroup is available
    kill_grace_seconds: float = 2.0  # SIGTERM -> SIGKILL after a wall timeout

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "cpu_cores"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("memory_bytes", "disk_bytes", "output_bytes", "max_processes", "open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int")
        if self.kill_grace_seconds < 0:
            raise ValueError("kill_grace_seconds must be >= 0")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class InputFile:
    """A file placed in the work dir before the job starts: either `data` or a host `source` file."""

    name: str
    data: bytes | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        check_relative_name(self.name)
        if (self.data is None) == (self.source is None):
            raise ValueError("an InputFile needs exactly one of data and source")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ExecSpec:
    """One job to run.

    `work_dir` must not exist yet (or be empty); the executor creates it, fills it with `inputs` and runs
    `command` there. As root, every ancestor of `work_dir` must be traversable by the unprivileged job uid.
    """

    command: tuple[str, ...]
    work_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[InputFile, ...] = ()
    outputs: tuple[str, ...] = ()  # names (relative to the work dir) to digest and return
    limits: Limits = Limits()
    gpus: tuple[int, ...] = ()  # granted GPU indices (NVML numbering)
    ro_binds: tuple[str, ...] = ()  # host dirs the job may read, at the same path (a runtime's venv)

    def __post_init__(self) -> None:
        if not all(p.startswith("/") and "\0" not in p for p in self.ro_binds):
            raise ValueError("ro_binds must be absolute paths")
        if not self.command or not all(isinstance(a, str) and "\0" not in a for a in self.command):
            raise ValueError("command must be a non-empty tuple of strings without NUL")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"bad environment variable {key!r}")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate input names")
        for name in self.outputs:
            check_relative_name(name)
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise ValueError("gpus must be distinct non-negative indices")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFile:
    name: str
    sha256: str  # hex
    size: int


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Metered usage. `gpu_seconds` is wall time times the number of granted GPUs."""

    cpu_seconds: float
    wall_seconds: float
    peak_memory_bytes: int
    gpu_seconds: float = 0.0


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ExecResult:
    """What came of a job.

    `exit_status` is the job's exit code; a job killed by signal N shows as 128 + N (as bubblewrap reports
    it), and it is None where the sandbox never started the command or the daemon killed it.
    `detail` says in words which fact decided `termination`.
    """

    termination: Termination
    exit_status: int | None
    outputs: tuple[OutputFile, ...]
    missing_outputs: tuple[str, ...]
    stdout: bytes
    stderr: bytes
    usage: Usage
    tier: Tier
    detail: str
