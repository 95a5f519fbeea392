"""Declared runtimes: software environments a provider offers jobs, bound read-only into the sandbox.

Theory of operation: a runtime is a directory (a venv) with a Python interpreter. The provider's config lists
them under ``[runtimes]`` (``NAME = "/path/to/venv"``); the default runtime ``python`` is the daemon's own Python.
At start each is *resolved*: its interpreter, the directories a job must see (the venv and the Python it was made
from), the environment that selects it (``PATH``, ``VIRTUAL_ENV``), and its lock hash (sha256 of ``coop.lock``,
the ``pip freeze`` written by :func:`build_venv`, else of the sorted ``name==version`` of its installed
distributions). A runtime whose directories the unprivileged job uid cannot reach is not offered, and
``node runtime list`` says why. Jobs name a runtime (optionally pinning its lock hash): the capacity ad lists
the offered ones, and a provider refuses a job for a runtime it does not have (``protocol.market``).

The default runtime, when the daemon's Python lives where the job uid cannot go (pyenv under a 0700 ``/root``,
say), falls back to the system interpreter of the same version under ``/usr`` with the daemon venv's
site-packages on ``PYTHONPATH``: same language version, same packages (pure-Python ones, and compiled ones for
that ABI).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from node.sandbox.command import BASE_PATH
from node.sandbox.detect import NOBODY, reachable_by
from protocol.messages import Runtime, runtime_name_ok

DEFAULT_RUNTIME: Final = "python"
LOCK_FILE: Final = "coop.lock"
SYSTEM_PREFIXES: Final = ("/usr", "/bin", "/lib", "/lib64")  # bound into every job already


class RuntimeError_(ValueError):
    """A runtime cannot be declared or built; the message says why and how to fix it (the user's to fix)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedRuntime:
    """A runtime as a provider offers it. ``error`` set: not offered, and why."""

    name: str
    path: str
    python: str = ""
    interpreter: str = ""
    lock_sha256: bytes = b""
    binds: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def usable(self) -> bool:
        return not self.error

    def wire(self) -> Runtime:
        return Runtime(name=self.name, interpreter=self.interpreter, lock_sha256=self.lock_sha256)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": self.path,
            "python": self.python,
            "interpreter": self.interpreter,
            "lock_sha256": self.lock_sha256.hex(),
            "usable": self.usable,
            "error": self.error,
        }


def check_name(name: str) -> str:
    if not runtime_name_ok(name):
        raise RuntimeError_(f"bad runtime name {name!r}: 1-32 of a-z, 0-9, '.', '_', '-', starting with a letter")
    return name


def _pyvenv_cfg(venv: Path) -> dict[str, str]:
    try:
        text = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def lock_hash(venv: Path) -> bytes:
    """sha256 of the venv's ``coop.lock``, else of its installed distributions as sorted ``name==version``."""
    lock = venv / LOCK_FILE
    if lock.is_file():
        return hashlib.sha256(lock.read_bytes()).digest()
    pins = sorted(
        f"{m.group(1).lower().replace('_', '-')}=={m.group(2)}"
        for site in venv.glob("lib/python*/site-packages")
        for d in site.glob("*.dist-info")
        if (m := re.fullmatch(r"(.+?)-([^-]+)\.dist-info", d.name))
    )
    return hashlib.sha256("\n".join(pins).encode()).digest()


def _outside_system(paths: list[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for p in dict.fromkeys(paths):
        if not any(p == s or p.startswith(s + "/") for s in SYSTEM_PREFIXES):
            kept.append(p)
    return tuple(kept)


def _unreachable(paths: tuple[str, ...], uid: int, gid: int) -> str:
    for p in paths:
        if not reachable_by(Path(p), uid, gid) or not os.access(p, os.R_OK):
            return p
    return ""


def resolve_venv(name: str, venv: Path, *, job_uid: int = NOBODY, job_gid: int = NOBODY) -> ResolvedRuntime:
    """Resolve a declared venv runtime (see the module docstring)."""
    venv = venv.expanduser().absolute()
    python = venv / "bin" / "python"
    cfg = _pyvenv_cfg(venv)
    if not python.exists() or not cfg:
        return ResolvedRuntime(name=name, path=str(venv), error=f"{venv} is not a venv (no bin/python, pyvenv.cfg)")
    real = python.resolve()
    base = str(real.parent.parent)  # <prefix>/bin/python3.X -> <prefix>
    binds = _outside_system([str(venv), base])
    env = {"PATH": f"{venv}/bin:{BASE_PATH}", "VIRTUAL_ENV": str(venv)}
    runtime = ResolvedRuntime(
        name=name,
        path=str(venv),
        python=str(python),
        interpreter=f"cpython-{cfg.get('version', cfg.get('version_info', '?'))}"[:64],
        lock_sha256=lock_hash(venv),
        binds=binds,
        env=env,
    )
    if os.getuid() == 0 and job_uid != 0:
        blocked = _unreachable(binds, job_uid, job_gid)
        if blocked:
            why = f"{blocked} is not readable by the job uid {job_uid}: make the venv from a Python under /usr"
            return ResolvedRuntime(name=name, path=str(venv), error=why)
    return runtime


def host_runtime(*, job_uid: int = NOBODY, job_gid: int = NOBODY) -> ResolvedRuntime:
    """The default runtime ``python``: this daemon's own Python and its venv's packages."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    purelib = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    binds = _outside_system([sys.prefix, sys.base_prefix])
    root = os.getuid() == 0 and job_uid != 0
    if not root or not _unreachable(binds, job_uid, job_gid):
        env = {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}"}
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        return ResolvedRuntime(name=DEFAULT_RUNTIME, path=sys.prefix, python=sys.executable,
                               interpreter=interpreter, lock_sha256=lock_hash(Path(sys.prefix)), binds=binds,
                               env=env)  # fmt: skip
    # The daemon's Python is out of the job uid's reach: the system's of the same version, with our packages.
    system = shutil.which(f"python{version}", path=BASE_PATH)
    sites = _outside_system([purelib, platlib])
    blocked = _unreachable(sites, job_uid, job_gid)
    if system is None or blocked:
        why = f"no python{version} under /usr" if system is None else f"{blocked} is not readable by uid {job_uid}"
        return ResolvedRuntime(name=DEFAULT_RUNTIME, path=sys.prefix, error=f"the daemon's Python is unreachable "
                               f"by the job uid and {why}")  # fmt: skip
    env = {"PATH": f"{Path(system).parent}:{BASE_PATH}", "PYTHONPATH": ":".join(sites)}
    return ResolvedRuntime(name=DEFAULT_RUNTIME, path=sys.prefix, python=system, interpreter=interpreter,
                           lock_sha256=lock_hash(Path(sys.prefix)), binds=sites, env=env)  # fmt: skip


def resolve_all(declared: Mapping[str, str], *, job_uid: int = NOBODY, job_gid: int = NOBODY) -> list[ResolvedRuntime]:
    """The default runtime (unless the config redefines ``python``) and every declared one, in config order."""
    out = [] if DEFAULT_RUNTIME in declared else [host_runtime(job_uid=job_uid, job_gid=job_gid)]
    out += [resolve_venv(n, Path(p), job_uid=job_uid, job_gid=job_gid) for n, p in declared.items()]
    return out


def job_uid_gid() -> tuple[int, int]:
    """The uid and gid jobs run as (see node.sandbox.detect.probe_host)."""
    return (NOBODY, NOBODY) if os.getuid() == 0 else (os.getuid(), os.getgid())


def build_venv(target: Path, *, requirements: Path | None, python: str | None = None) -> Path:
    """Build a runtime venv at ``target`` from a requirements file, with cloudpickle (function jobs need it).

    The interpreter defaults to the system's Python of this version under /usr (a job uid can reach it),
    else this one. Writes ``coop.lock`` (``pip freeze``), whose sha256 is the runtime's lock hash.

    Raises:
        RuntimeError_: the venv or the install failed; the message carries pip's last lines.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = python or shutil.which(f"python{version}", path=BASE_PATH) or sys.executable
    if target.exists() and any(target.iterdir()):
        raise RuntimeError_(f"{target} exists and is not empty")
    steps = [[python, "-m", "venv", str(target)]]
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q", "cloudpickle>=3,<4"]
    steps.append([*pip, *(["-r", str(requirements)] if requirements else [])])
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError_(f"{' '.join(argv[:4])} failed:\n{tail}")
    freeze = subprocess.run([str(target / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    (target / LOCK_FILE).write_text(freeze.stdout)
    return target
