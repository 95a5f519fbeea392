"""Pure builders for the command lines that start a job (policy; the executor only runs them).

Tier A's process chain, every step an exec in the same process (so the daemon's PDEATHSIG and pid stay valid):

    sh trampoline (joins the job's cgroups) -> setpriv (root only: drop to the job uid)
      -> bwrap (namespaces, mounts, seccomp) -> prlimit (rlimits, inside the user namespace) -> the job

Tier B and unsandboxed: sh trampoline is not needed (the launcher joins the cgroups itself):

    python launch_b.py CONFIG -> fork -> (uid drop, rlimits, Landlock, seccomp) -> the job
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from node.sandbox.detect import BWRAP_SIZE_OPTION, GpuFacts, HostLayout
from node.sandbox.spec import ExecSpec, Limits

SANDBOX_WORK_DIR: Final = "/job"  # where tier A mounts the work dir
BASE_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
LAUNCHER: Final = Path(__file__).with_name("launch_b.py")
NVIDIA_SHARED_DEVICES: Final = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
TRAMPOLINE: Final = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Rlimit:
    name: str  # resource module name: "RLIMIT_CPU"
    flag: str  # prlimit option: "--cpu"
    soft: int
    hard: int


def rlimits(limits: Limits, *, cap_address_space: bool) -> tuple[Rlimit, ...]:
    """The rlimits for a job. RLIMIT_AS only when nothing better caps memory (it breaks CUDA and the JVM)."""
    cpu = max(1, math.ceil(limits.cpu_seconds))
    out = [
        Rlimit(name="RLIMIT_CPU", flag="--cpu", soft=cpu, hard=cpu + 1),  # SIGXCPU, then SIGKILL a second later
        Rlimit(name="RLIMIT_FSIZE", flag="--fsize", soft=limits.disk_bytes, hard=limits.disk_bytes),
        Rlimit(name="RLIMIT_NOFILE", flag="--nofile", soft=limits.open_files, hard=limits.open_files),
        Rlimit(name="RLIMIT_CORE", flag="--core", soft=0, hard=0),
    ]
    if cap_address_space:
        out.append(Rlimit(name="RLIMIT_AS", flag="--as", soft=limits.memory_bytes, hard=limits.memory_bytes))
    return tuple(out)


def gpu_plan(granted: Sequence[int], known: Sequence[GpuFacts]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Device nodes to expose and environment for granted GPUs.

    Only the granted /dev/nvidia<minor> nodes (plus the driver's shared control nodes) are visible. CUDA
    numbers the visible devices from 0, so CUDA_VISIBLE_DEVICES names them by UUID where NVML told us,
    which is unambiguous either way; otherwise by their renumbered index.
    """
    if not granted:
        return (), {}
    by_index = {g.index: g for g in known}
    devices = [f"/dev/nvidia{by_index[i].minor if i in by_index else i}" for i in granted]
    if all(i in by_index for i in granted):
        visible = ",".join(by_index[i].uuid for i in granted)
    else:
        visible = ",".join(str(n) for n in range(len(granted)))
    env = {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible}
    return (*devices, *NVIDIA_SHARED_DEVICES), env


def job_env(spec: ExecSpec, *, home: str, extra: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": BASE_PATH, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "COOP_WORK_DIR": home}
    env.update(spec.env)
    env.update(extra)  # GPU visibility is the executor's, not the job's, to choose
    return env


def _layout_args(layout: HostLayout) -> list[str]:
    args: list[str] = []
    for d in layout.dirs:
        args += ["--ro-bind", d, d]
    for target, path in layout.symlinks:
        args += ["--symlink", target, path]
    for e in layout.etc_files:
        args += ["--ro-bind-try", e, e]
    return args


BWRAP_ISOLATION: Final = (
    "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv",
    "--hostname", "coop-job",
)  # fmt: skip


def drop_argv(setpriv: str | None, uid: int, gid: int) -> list[str]:
    if setpriv is None:
        return []
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def bwrap_probe_argv(*, bwrap: str, layout: HostLayout, setpriv: str | None, uid: int, gid: int) -> list[str]:
    """The trial sandbox `detect` runs: the same isolation as a job, running `true`."""
    return [
        *drop_argv(setpriv, uid, gid), bwrap, *BWRAP_ISOLATION, *_layout_args(layout),
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--remount-ro", "/", "--", "true",
    ]  # fmt: skip


def bwrap_argv(
    spec: ExecSpec,
    *,
    bwrap: str,
    bwrap_version: tuple[int, ...] | None,
    layout: HostLayout,
    prlimit: str,
    limits: Sequence[Rlimit],
    seccomp_fd: int,
    status_fd: int,
    args_fd: int,
    devices: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> tuple[list[str], bytes]:
    """bwrap's command line for a tier A job (without the trampoline or setpriv in front).

    Returns:
        The command line and the bytes to serve on `args_fd`: the job's environment, which may hold a client's
        secrets and so must not appear in the world-readable command line (bwrap reads it with `--args FD`).
    """
    args = [bwrap, *BWRAP_ISOLATION, *_layout_args(layout), "--proc", "/proc", "--dev", "/dev"]
    if bwrap_version is not None and bwrap_version >= BWRAP_SIZE_OPTION:
        args += ["--size", str(spec.limits.disk_bytes)]
    args += ["--tmpfs", "/tmp", "--bind", str(spec.work_dir), SANDBOX_WORK_DIR, "--chdir", SANDBOX_WORK_DIR]
    for path in spec.ro_binds:
        args += ["--ro-bind", path, path]
    for dev in devices:
        args += ["--dev-bind-try", dev, dev]
    private: list[str] = []
    for key, value in job_env(spec, home=SANDBOX_WORK_DIR, extra=extra_env or {}).items():
        private += ["--setenv", key, value]
    args += [
        "--args",
        str(args_fd),
        "--seccomp",
        str(seccomp_fd),
        "--json-status-fd",
        str(status_fd),
        "--remount-ro",
        "/",
        "--",
    ]
    args += [prlimit, *(f"{r.flag}={r.soft}:{r.hard}" for r in limits)]
    args += [f"--nproc={spec.limits.max_processes}", "--", *spec.command]
    return args, "".join(f"{a}\0" for a in private).encode()


def trampoline_argv(procs_files: Sequence[str], rest: Sequence[str]) -> list[str]:
    """Prefix `rest` with a shell that writes its pid into each cgroup, then execs `rest`."""
    if not procs_files:
        return list(rest)
    return ["/bin/sh", "-c", TRAMPOLINE, "coop-trampoline", str(len(procs_files)), *procs_files, *rest]


def launcher_argv(
    spec: ExecSpec,
    *,
    python: str,
    parent_pid: int,
    status_fd: int,
    config_fd: int,
    uid: int | None,
    gid: int | None,
    limits: Sequence[Rlimit],
    cgroup_procs: Sequence[str],
    landlock_abi: int,
    sandboxed: bool,
    layout: HostLayout,
    devices: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> tuple[list[str], bytes]:
    """The tier B (sandboxed=True) or unsandboxed launcher's command line, and its config for `config_fd`."""
    work = str(spec.work_dir)
    env = job_env(spec, home=work, extra=extra_env or {})
    env["TMPDIR"] = work  # no private /tmp without a mount namespace; /tmp is not writable under Landlock
    read_paths = [*layout.dirs, *(path for _target, path in layout.symlinks), *layout.etc_files, *spec.ro_binds]
    config = {
        "parent_pid": parent_pid,
        "status_fd": status_fd,
        "work_dir": work,
        "uid": uid,
        "gid": gid,
        "rlimits": [[r.name, r.soft, r.hard] for r in limits],
        "nproc": spec.limits.max_processes,
        "cgroup_procs": list(cgroup_procs),
        "landlock": sandboxed,
        "landlock_abi": landlock_abi,
        "seccomp": sandboxed,
        "read_paths": read_paths,
        "device_paths": ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", *devices],
        "env": env,
    }
    return [python, "-I", "-S", str(LAUNCHER), str(config_fd), *spec.command], json.dumps(config).encode()
