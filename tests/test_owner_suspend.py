"""Suspending and resuming a real sandboxed job (owner policy): cgroup freezer and SIGSTOP, tiers A and B.

The job itself measures the longest gap between its own steps, so it proves it was frozen; after resuming it
finishes with the right output, and the time it spent suspended is neither metered nor counted against its
wall-clock limit.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.sandbox import ExecSpec, Limits, Termination, Tier
from node.sandbox.cgroups import JobCgroup
from node.sandbox.detect import HostFacts
from node.sandbox.doctor import collect_facts
from node.sandbox.executor import Executor
from tests.fixtures.sandbox import jobs

HOLD_S = 1.5  # how long the test keeps the job suspended

STEPPER = r"""
import sys, time
# The clock starts before "ready": a job frozen right after printing it must still see the stop as a gap.
gaps, last, start = [0.0], time.monotonic(), time.monotonic()
print("ready", flush=True)
# Step until a stop has been seen (or 15 s passed): under load the test's "ready" may arrive late, so a fixed
# number of steps could all run before the owner suspends the job.
while max(gaps) < 1.0 and last - start < 15:
    time.sleep(0.05)
    now = time.monotonic()
    gaps.append(now - last)
    last = now
print(f"sum={sum(range(30))} longest_gap={max(gaps):.2f}", flush=True)
"""


@pytest.fixture(scope="module")
def facts() -> HostFacts:
    return collect_facts(gpus=False)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="coop-own-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("method", ["cgroup", "sigstop"])
@pytest.mark.parametrize("tier", [Tier.BWRAP, Tier.LANDLOCK], ids=["tierA", "tierB"])
async def test_suspend_and_resume(
    tier: Tier, method: str, facts: HostFacts, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = Executor(facts=facts, max_concurrent=2, tier=tier)
    if executor.decision.tier is None:
        pytest.skip(f"{tier} unavailable here: {executor.decision.reason}")
    if method == "cgroup" and not (executor.cgroups.v2_base or executor.cgroups.v1("freezer")):
        pytest.skip("no writable cgroup freezer here")
    if method == "sigstop":
        monkeypatch.setattr(JobCgroup, "freeze", lambda self, frozen: False)
    marker = jobs.new_marker()
    ready = trio.Event()
    methods: list[str] = []

    async def on_output(_stream: str, chunk: bytes) -> None:
        if b"ready" in chunk:
            ready.set()

    async def owner_takes_the_machine() -> None:
        await ready.wait()
        methods.extend(executor.suspend_all())
        assert executor.job_counts() == (0, 1)
        assert executor.suspend_all() == []  # already suspended: nothing more to do
        await trio.sleep(HOLD_S)  # the owner keeps the machine for a while (not a synchronisation wait)
        assert executor.resume_all() == 1

    spec = ExecSpec(
        command=jobs.py(STEPPER, marker),
        work_dir=base / uuid.uuid4().hex,
        limits=Limits(wall_seconds=20.0, kill_grace_seconds=0.2),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner_takes_the_machine)
            result = await executor.run(spec, on_output=on_output)
    assert methods == [method]
    assert result.termination is Termination.EXITED, result
    assert result.exit_status == 0, result
    out = result.stdout.decode().split()
    assert out[:2] == ["ready", f"sum={sum(range(30))}"], out
    assert float(out[2].split("=")[1]) >= HOLD_S - 0.1, out  # the job saw itself stop for the whole hold
    assert executor.job_counts() == (0, 0)
    assert executor.jobs_cpu_seconds() > 0
    assert jobs.leftovers(marker) == []


async def test_a_suspended_job_is_killed_cleanly(facts: HostFacts, base: Path) -> None:
    """Cancelling (preempting) a suspended job kills it: nothing is left stopped or frozen behind."""
    executor = Executor(facts=facts, max_concurrent=2)
    if executor.decision.tier is None:
        pytest.skip(executor.decision.reason)
    marker = jobs.new_marker()
    scope = trio.CancelScope()

    async def on_output(_stream: str, chunk: bytes) -> None:
        if b"ready" in chunk:
            assert executor.suspend_all()
            scope.cancel()

    spec = ExecSpec(command=jobs.py(jobs.SLEEPER, marker), work_dir=base / uuid.uuid4().hex)
    with trio.fail_after(30):
        result = await executor.run(spec, on_output=on_output, cancel_scope=scope)
    assert result.termination is Termination.CANCELLED, result
    assert jobs.leftovers(marker) == []
