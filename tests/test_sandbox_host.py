"""The executor on this host, around the hostile-job suite: tier selection on simulated hosts (refusal, fallback
to tier B), unsandboxed mode, admission, GPU grants, the job uid, the doctor, and work dir errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.sandbox import AdmissionRefused, ExecSpec, Limits, SandboxUnavailable, Termination, Tier, WorkDirError
from node.sandbox.detect import BwrapFacts, GpuFacts, HostFacts, UsernsFacts, reachable_by, stage_for_uid
from node.sandbox.doctor import collect_facts, render_report
from node.sandbox.executor import Executor
from tests.fixtures.sandbox import jobs


@pytest.fixture(scope="module")
def facts() -> HostFacts:
    return collect_facts(gpus=False)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="coop-sbx-host-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def work(base: Path) -> Path:
    return base / uuid.uuid4().hex


def without_userns(facts: HostFacts) -> HostFacts:
    """This host as it would look with unprivileged user namespaces switched off."""
    return dataclasses.replace(
        facts,
        bwrap=dataclasses.replace(facts.bwrap, works=False, error="bwrap: No permissions to create new namespace"),
        userns=UsernsFacts(max_user_namespaces=0),
    )


def need_tier(facts: HostFacts, tier: Tier) -> None:
    decision = Executor(facts=facts, tier=tier).decision
    if decision.tier is not tier:
        pytest.skip(f"{tier} unavailable here: {decision.reason}")


async def test_refuses_native_jobs_without_any_tier(facts: HostFacts, work: Path) -> None:
    executor = Executor(facts=dataclasses.replace(without_userns(facts), landlock_abi=0))
    assert executor.decision.tier is None
    with trio.fail_after(10), pytest.raises(SandboxUnavailable, match=r"user\.max_user_namespaces") as info:
        await executor.run(ExecSpec(command=("true",), work_dir=work))
    assert "--allow-unsandboxed" in str(info.value)
    assert not await trio.Path(work).exists()
    assert executor.statistics().refused == 1


async def test_falls_back_to_tier_b_without_user_namespaces(facts: HostFacts, work: Path) -> None:
    need_tier(facts, Tier.LANDLOCK)
    executor = Executor(facts=without_userns(facts))
    assert executor.decision.tier is Tier.LANDLOCK
    assert "tier A unavailable" in executor.decision.reason
    with trio.fail_after(10):
        result = await executor.run(
            ExecSpec(command=("sh", "-c", "echo $COOP_WORK_DIR; cat /etc/hostname"), work_dir=work)
        )
    assert result.tier is Tier.LANDLOCK
    assert result.termination is Termination.EXITED
    assert result.stdout == f"{work}\n".encode()
    assert b"Permission denied" in result.stderr


async def test_unsandboxed_is_loud(facts: HostFacts, work: Path, caplog: pytest.LogCaptureFixture) -> None:
    executor = Executor(facts=dataclasses.replace(without_userns(facts), landlock_abi=0), allow_unsandboxed=True)
    assert executor.decision.tier is Tier.UNSANDBOXED
    assert "UNSANDBOXED" in caplog.text
    with trio.fail_after(10):
        result = await executor.run(ExecSpec(command=("sh", "-c", "exit 3"), work_dir=work))
    assert result.exit_status == 3
    assert result.detail.startswith("UNSANDBOXED")


async def test_admission_refuses_excess(facts: HostFacts, base: Path) -> None:
    executor = Executor(facts=facts, max_concurrent=1, allow_unsandboxed=True)
    marker = jobs.new_marker()
    scope = trio.CancelScope()
    ready = trio.Event()

    async def on_output(_stream: str, _chunk: bytes) -> None:
        ready.set()

    async def first() -> None:
        spec = ExecSpec(command=jobs.py(jobs.SLEEPER, marker), work_dir=base / uuid.uuid4().hex)
        result = await executor.run(spec, on_output=on_output, cancel_scope=scope)
        assert result.termination is Termination.CANCELLED

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await ready.wait()
            with pytest.raises(AdmissionRefused) as info:
                await executor.run(ExecSpec(command=("true",), work_dir=base / uuid.uuid4().hex))
            assert (info.value.code, info.value.retryable) == ("busy", True)
            with pytest.raises(AdmissionRefused, match="does not offer GPU"):
                await executor.run(ExecSpec(command=("true",), work_dir=base / uuid.uuid4().hex, gpus=(7,)))
            scope.cancel()
    assert executor.statistics().refused == 2
    assert jobs.leftovers(marker) == []


async def test_granted_gpu_is_named_and_metered(facts: HostFacts, work: Path) -> None:
    need_tier(facts, Tier.BWRAP)
    fake = dataclasses.replace(facts, gpus=(GpuFacts(index=0, minor=0, uuid="GPU-0000-test", name="fake"),))
    executor = Executor(facts=fake)
    script = "echo $CUDA_VISIBLE_DEVICES; ls /dev"
    with trio.fail_after(10):
        result = await executor.run(ExecSpec(command=("sh", "-c", script), work_dir=work, gpus=(0,)))
    lines = result.stdout.decode().split()
    assert lines[0] == "GPU-0000-test"
    assert not [d for d in lines[1:] if d.startswith("nvidia") and d != "nvidia0"]  # only the granted node
    assert result.usage.gpu_seconds == pytest.approx(result.usage.wall_seconds)


@pytest.mark.skipif(os.getuid() != 0, reason="the uid drop only happens when the daemon runs as root")
async def test_root_daemon_runs_jobs_unprivileged(facts: HostFacts, work: Path) -> None:
    need_tier(facts, Tier.BWRAP)
    executor = Executor(facts=facts)
    script = "id -u; touch made; ls /proc | grep -c '^[0-9]'"
    with trio.fail_after(10):
        result = await executor.run(ExecSpec(command=("sh", "-c", script), work_dir=work))
    uid, procs = result.stdout.decode().split()
    assert uid == "65534"
    assert (work / "made").stat().st_uid == 65534
    assert int(procs) <= 4  # its own PID namespace: bwrap's pid 1, sh, ls, grep


async def test_work_dir_errors(facts: HostFacts, base: Path) -> None:
    executor = Executor(facts=facts, allow_unsandboxed=True)
    busy = base / uuid.uuid4().hex
    busy.mkdir()
    (busy / "file").write_text("x")
    with trio.fail_after(10), pytest.raises(WorkDirError, match="not an empty directory"):
        await executor.run(ExecSpec(command=("true",), work_dir=busy))
    if os.getuid() == 0:
        hidden = Path(tempfile.mkdtemp(prefix="coop-sbx-private-"))  # 0700: nobody cannot reach inside
        try:
            with trio.fail_after(10), pytest.raises(WorkDirError, match="cannot reach"):
                await executor.run(ExecSpec(command=("true",), work_dir=hidden / "job"))
        finally:
            shutil.rmtree(hidden)
    assert executor.statistics().running == 0


async def test_sandbox_error_is_reported(facts: HostFacts, work: Path) -> None:
    need_tier(facts, Tier.BWRAP)
    broken = dataclasses.replace(facts, prlimit="/no/such/prlimit")  # exec inside the sandbox fails
    with trio.fail_after(10):
        result = await Executor(facts=broken).run(ExecSpec(command=("true",), work_dir=work, limits=Limits()))
    assert result.termination is Termination.SANDBOX_ERROR
    assert "execvp" in result.detail


def test_doctor_on_this_host(facts: HostFacts) -> None:
    report = render_report(facts)
    assert report.startswith("Coop sandbox doctor")
    assert "Tier:" in report
    assert "bubblewrap" in report
    assert isinstance(facts.bwrap, BwrapFacts)


def test_stale_job_cgroups_are_swept(facts: HostFacts) -> None:
    bases = [b for _c, b in facts.cgroups.v1_bases] + ([facts.cgroups.v2_base] if facts.cgroups.v2_base else [])
    if not bases:
        pytest.skip("no writable cgroup here")
    dead_pid = 2**22 + 1  # above the kernel's largest pid_max: no such process
    stale = [Path(b) / f"coop-{dead_pid}-1" for b in bases]
    for d in stale:
        d.mkdir()
    Executor(facts=facts)
    assert [d for d in stale if d.exists()] == []


@pytest.mark.skipif(os.getuid() != 0, reason="staging only happens for a root daemon")
def test_unreachable_bwrap_is_staged_for_the_job_uid(facts: HostFacts) -> None:
    if facts.bwrap.path is None:
        pytest.skip("no bwrap here")
    private = Path(tempfile.mkdtemp(prefix="coop-sbx-bwrap-"))  # 0700: uid 65534 cannot reach inside
    try:
        hidden = private / "bwrap"
        shutil.copy(facts.bwrap.path, hidden)
        assert not reachable_by(hidden, 65534, 65534)
        staged = Path(stage_for_uid(str(hidden), 65534))
        assert reachable_by(staged, 65534, 65534)
        assert staged.stat().st_uid == 0
        assert staged.stat().st_mode & 0o777 == 0o755
    finally:
        shutil.rmtree(private)
