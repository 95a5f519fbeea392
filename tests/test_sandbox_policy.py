"""Pure sandbox policy: specs, admission, verdicts, tier choice on simulated hosts, the doctor's report,
command lines, the seccomp program and cgroup parsing on recorded files. Nothing here runs a job."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from node.sandbox import command, seccomp
from node.sandbox.cgroups import CgroupFacts, parse_mounts, parse_proc_cgroup
from node.sandbox.detect import BwrapFacts, GpuFacts, HostFacts, HostLayout, UsernsFacts, choose_tier
from node.sandbox.doctor import render_report
from node.sandbox.policy import Capacity, JobFacts, admit, classify
from node.sandbox.spec import ExecSpec, InputFile, Limits, Termination, Tier

FIXTURES = Path(__file__).parent / "fixtures" / "sandbox"
MIB = 1 << 20


def make_facts(**overrides: object) -> HostFacts:
    """A healthy root host like the project's machines; override fields to simulate others."""
    facts = HostFacts(
        uid=0,
        job_uid=65534,
        job_gid=65534,
        machine="x86_64",
        kernel="6.18.0",
        bwrap=BwrapFacts(path="/usr/bin/bwrap", version=(0, 11, 0), works=True),
        userns=UsernsFacts(max_user_namespaces=15000),
        seccomp=True,
        landlock_abi=7,
        cgroups=CgroupFacts(
            v2_base="/sys/fs/cgroup/unified",
            v2_kill=True,
            v1_bases=(("memory", "/m"), ("pids", "/p")),
            mounted=("v1", "v2"),
        ),
        prlimit="/usr/bin/prlimit",
        setpriv="/usr/bin/setpriv",
        python="/usr/bin/python3",
        layout=HostLayout(symlinks=(("usr/bin", "/bin"),), dirs=("/usr",), etc_files=("/etc/ld.so.cache",)),
    )
    return dataclasses.replace(facts, **overrides)  # type: ignore[arg-type]


NO_USERNS = {
    "bwrap": BwrapFacts(
        path="/usr/bin/bwrap",
        version=(0, 8, 0),
        works=False,
        error="bwrap: No permissions to create new namespace, likely because the kernel does not allow "
        "non-privileged user namespaces.",
    ),
    "userns": UsernsFacts(max_user_namespaces=15000, unprivileged_userns_clone=0),
}


def spec(**kw: object) -> ExecSpec:
    return ExecSpec(command=("true",), work_dir=Path("/w"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "a//b", "./a", "a/", "x\0y"])
def test_bad_file_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"name|component"):
        spec(outputs=(name,))


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        InputFile(name="a", data=b"x", source=Path("/etc/hostname"))
    with pytest.raises(ValueError, match="duplicate"):
        spec(inputs=(InputFile(name="a", data=b""), InputFile(name="a", data=b"")))
    with pytest.raises(ValueError, match="environment"):
        spec(env={"A=B": "c"})
    with pytest.raises(ValueError, match="command"):
        ExecSpec(command=(), work_dir=Path("/w"))
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=0)
    s = spec(env={"A": "1"})
    with pytest.raises(TypeError):
        s.env["B"] = "2"  # type: ignore[index]


def test_admission() -> None:
    cap = Capacity(max_concurrent=2, memory_bytes=1024 * MIB, gpus=(0, 1))
    big = spec(limits=Limits(memory_bytes=600 * MIB))
    assert admit(cap, [], big).admitted
    refused = admit(cap, [big], big)
    assert (refused.code, refused.retryable) == ("memory-busy", True)
    assert admit(cap, [], spec(limits=Limits(memory_bytes=2048 * MIB))).code == "memory-too-large"
    small = spec(limits=Limits(memory_bytes=MIB))
    busy = admit(cap, [small, small], small)
    assert (busy.code, busy.retryable) == ("busy", True)
    assert "at most 2" in busy.reason
    assert admit(cap, [], spec(gpus=(2,))).code == "gpu-unavailable"
    assert admit(cap, [spec(gpus=(0,))], spec(gpus=(0,))).code == "gpu-busy"
    assert admit(cap, [spec(gpus=(0,))], spec(gpus=(1,))).admitted


def test_classify_from_facts() -> None:
    base = {"started": True, "exit_status": 0, "cpu_limit": 10.0, "disk_limit": 1000}
    assert classify(JobFacts(killed_for=None, **base))[0] is Termination.EXITED
    killed = classify(JobFacts(killed_for=Termination.WALL_TIMEOUT, kill_detail="too slow", **base))
    assert killed == (Termination.WALL_TIMEOUT, "too slow")
    assert classify(JobFacts(killed_for=None, **{**base, "started": False}))[0] is Termination.SANDBOX_ERROR
    assert (
        classify(JobFacts(killed_for=None, oom_kills=1, **{**base, "exit_status": 137}))[0] is Termination.MEMORY_LIMIT
    )
    assert classify(JobFacts(killed_for=None, **{**base, "exit_status": 128 + 24}))[0] is Termination.CPU_LIMIT
    hard = JobFacts(killed_for=None, cpu_seconds=11.0, **{**base, "exit_status": 137})
    assert classify(hard)[0] is Termination.CPU_LIMIT
    assert classify(JobFacts(killed_for=None, **{**base, "exit_status": 137}))[1] == "killed by signal 9"
    assert classify(JobFacts(killed_for=None, **{**base, "exit_status": 128 + 25}))[0] is Termination.DISK_LIMIT
    full = JobFacts(killed_for=None, disk_used=1000, **{**base, "exit_status": 1})
    assert classify(full)[0] is Termination.DISK_LIMIT


def test_tier_a_on_a_healthy_host() -> None:
    decision = choose_tier(make_facts())
    assert decision.tier is Tier.BWRAP
    assert "uid 65534" in decision.reason
    assert any("seccomp" in layer for layer in decision.layers)


def test_tier_b_without_user_namespaces() -> None:
    decision = choose_tier(make_facts(**NO_USERNS))
    assert decision.tier is Tier.LANDLOCK
    assert "tier A unavailable" in decision.reason
    assert "namespace" in decision.reason
    assert any("unprivileged_userns_clone" in fix for fix in decision.fixes)


def test_refusal_without_any_tier() -> None:
    decision = choose_tier(make_facts(**NO_USERNS, landlock_abi=0))
    assert decision.tier is None
    for needle in ("refuses", "kernel.unprivileged_userns_clone=1", "user.max_user_namespaces", "Landlock",
                   "--allow-unsandboxed"):  # fmt: skip
        assert needle in decision.reason
    loud = choose_tier(make_facts(**NO_USERNS, landlock_abi=0), allow_unsandboxed=True)
    assert loud.tier is Tier.UNSANDBOXED
    assert loud.reason.startswith("UNSANDBOXED")


def test_other_tier_inputs() -> None:
    assert choose_tier(make_facts(prlimit=None)).tier is Tier.LANDLOCK
    assert choose_tier(make_facts(setpriv=None)).tier is Tier.LANDLOCK
    assert choose_tier(make_facts(setpriv=None, uid=1000, job_uid=1000)).tier is Tier.BWRAP
    assert choose_tier(make_facts(seccomp=False)).tier is None
    assert choose_tier(make_facts(bwrap=BwrapFacts())).tier is Tier.LANDLOCK
    assert choose_tier(make_facts(bwrap=BwrapFacts(path="/b", version=(0, 4, 0), works=True))).tier is Tier.LANDLOCK
    assert choose_tier(make_facts(), want=Tier.LANDLOCK).tier is Tier.LANDLOCK
    assert choose_tier(make_facts(**NO_USERNS), want=Tier.BWRAP).tier is None
    assert choose_tier(make_facts(), want=Tier.UNSANDBOXED).tier is None


def test_doctor_report() -> None:
    healthy = render_report(make_facts())
    assert "Tier: A (bubblewrap)" in healthy
    assert "[ok] seccomp" in healthy
    assert "Landlock" in healthy
    assert "cgroup memory" in healthy
    degraded = render_report(make_facts(**NO_USERNS, cgroups=CgroupFacts(), gpus=(), nvml="NVML unavailable"))
    assert "Tier: B (Landlock)" in degraded
    assert "[--] bubblewrap" in degraded
    assert "To fix:" in degraded
    assert "sysctl -w kernel.unprivileged_userns_clone=1" in degraded
    assert "Delegate=yes" in degraded
    assert "RLIMIT_AS only" in degraded
    none = render_report(make_facts(**NO_USERNS, landlock_abi=0))
    assert "Tier: none: native jobs are refused" in none


def test_bwrap_argv() -> None:
    s = spec(env={"FOO": "bar", "CUDA_VISIBLE_DEVICES": "all"}, gpus=(1,))
    devices, gpu_env = command.gpu_plan(s.gpus, [GpuFacts(index=1, minor=3, uuid="GPU-abc")])
    limits = command.rlimits(s.limits, cap_address_space=False)
    argv, private = command.bwrap_argv(
        s, bwrap="/b", bwrap_version=(0, 11, 0), layout=make_facts().layout, prlimit="/usr/bin/prlimit",
        limits=limits, seccomp_fd=5, status_fd=6, args_fd=7, devices=devices, extra_env=gpu_env,
    )  # fmt: skip
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv",
                 "--disable-userns", "--seccomp", "--json-status-fd"):  # fmt: skip
        assert flag in argv
    remount = argv.index("--remount-ro")
    assert argv[remount + 1] == "/"
    assert remount > max(i for i, a in enumerate(argv) if a.startswith("--bind"))
    assert argv[argv.index("--bind") + 1 : argv.index("--bind") + 3] == ["/w", "/job"]
    assert argv[-2:] == ["--", "true"]
    assert "/usr/bin/prlimit" in argv
    assert "--nproc=64" in argv
    assert not any(a.startswith("--as=") for a in argv)
    assert "--size" in argv
    old, _ = command.bwrap_argv(
        s, bwrap="/b", bwrap_version=(0, 8, 0), layout=make_facts().layout, prlimit="/p", limits=limits,
        seccomp_fd=5, status_fd=6, args_fd=7,
    )  # fmt: skip
    assert "--size" not in old
    # The environment goes through --args FD, never into the world-readable command line.
    assert argv[argv.index("--args") + 1] == "7"
    assert "--setenv" not in argv
    assert not any("bar" in a for a in argv)
    words = private.decode().split("\0")
    assert words[-1] == ""
    env = {words[i + 1]: words[i + 2] for i, a in enumerate(words) if a == "--setenv"}
    assert env["FOO"] == "bar"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-abc"
    assert env["HOME"] == "/job"
    assert argv[argv.index("/dev/nvidia3") - 1] == "--dev-bind-try"
    assert "/dev/nvidia1" not in argv


def test_gpu_plan_without_nvml() -> None:
    devices, env = command.gpu_plan((2, 5), [])
    assert devices[:2] == ("/dev/nvidia2", "/dev/nvidia5")
    assert "/dev/nvidiactl" in devices
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # CUDA renumbers the visible devices
    assert command.gpu_plan((), []) == ((), {})


def test_rlimits_and_trampoline() -> None:
    limits = {r.name: r for r in command.rlimits(Limits(cpu_seconds=0.5, memory_bytes=MIB), cap_address_space=True)}
    assert (limits["RLIMIT_CPU"].soft, limits["RLIMIT_CPU"].hard) == (1, 2)
    assert limits["RLIMIT_AS"].soft == MIB
    argv = command.trampoline_argv(["/cg/a/cgroup.procs", "/cg/b/cgroup.procs"], ["bwrap", "x"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[4:] == ["2", "/cg/a/cgroup.procs", "/cg/b/cgroup.procs", "bwrap", "x"]
    assert command.trampoline_argv([], ["bwrap"]) == ["bwrap"]


def _decode(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


def test_seccomp_program_shape() -> None:
    prog = _decode(seccomp.build_filter("x86_64"))
    assert prog[0] == (0x20, 0, 0, 4)  # load arch
    assert prog[1][3] == 0xC000003E
    assert prog[2] == (0x06, 0, 0, seccomp.RET_KILL_PROCESS)
    assert prog[-1] == (0x06, 0, 0, seccomp.RET_ALLOW)
    for i, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # a jump: both targets stay inside the program
            assert i + 1 + max(jt, jf) < len(prog)
    compared = {k for code, _jt, _jf, k in prog if code == 0x15}
    table = seccomp.ARCHES["x86_64"].syscalls
    assert all(table[name] in compared for name in seccomp.DENIED)
    assert len(_decode(seccomp.build_filter("aarch64"))) > 50
    with pytest.raises(ValueError, match="no seccomp syscall table"):
        seccomp.build_filter("sparc")


def test_cgroup_parsing_hybrid() -> None:
    own = parse_proc_cgroup((FIXTURES / "proc-cgroup-hybrid.txt").read_text())
    assert own["memory"].startswith("/process_api/")
    assert own[""] == "/"
    assert own["pids"] == "/"
    mounts = parse_mounts((FIXTURES / "mounts-hybrid.txt").read_text())
    assert ("cgroup2", "/sys/fs/cgroup/unified") in [(t, m) for t, m, _o in mounts]
    assert {"memory", "pids", "cpu", "cpuacct", "freezer"} <= {
        o for t, _m, opts in mounts if t == "cgroup" for o in opts
    }
    assert all(t in ("cgroup", "cgroup2") for t, _m, _o in mounts)  # the tmpfs holding them is not one


def test_cgroup_parsing_pure_v2() -> None:
    own = parse_proc_cgroup((FIXTURES / "proc-cgroup-v2.txt").read_text())
    assert own == {"": "/user.slice/user-1000.slice/user@1000.service/app.slice/coop.service"}
    assert [(t, m) for t, m, _o in parse_mounts((FIXTURES / "mounts-v2.txt").read_text())] == [
        ("cgroup2", "/sys/fs/cgroup")
    ]


def test_cgroup_facts_summary() -> None:
    assert CgroupFacts().usable_controllers() == ()
    assert CgroupFacts().version == "none"
    delegated = CgroupFacts(v2_base="/x", v2_controllers=("memory", "pids", "cpu"), v2_kill=True, mounted=("v2",))
    assert delegated.usable_controllers() == ("memory", "pids", "cpu", "cpuacct", "kill")
    assert delegated.version == "v2"
    kill_only = CgroupFacts(v2_base="/x", v2_kill=True, mounted=("v1", "v2"))
    assert kill_only.usable_controllers() == ("cpuacct", "kill")
    assert kill_only.version == "hybrid"
