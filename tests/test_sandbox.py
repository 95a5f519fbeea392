"""Hostile and honest jobs through the real executor, in tier A (bubblewrap) and tier B (Landlock).

Each hostile job must be contained, killed, reported with the right termination reason, and leave nothing
running (checked by scanning processes for the test's marker) and no cgroup behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from node.sandbox import ExecResult, ExecSpec, InputFile, Limits, Termination, Tier
from node.sandbox.detect import HostFacts
from node.sandbox.doctor import collect_facts
from node.sandbox.executor import Executor
from tests.fixtures.sandbox import jobs

MIB = 1 << 20


@pytest.fixture(scope="session")
def facts() -> HostFacts:
    return collect_facts(gpus=False)


@pytest.fixture(scope="session")
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="coop-sbx-"))
    d.chmod(0o711)  # the job uid must be able to reach work dirs inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=[Tier.BWRAP, Tier.LANDLOCK], ids=["tierA", "tierB"])
def executor(request: pytest.FixtureRequest, facts: HostFacts) -> Executor:
    ex = Executor(facts=facts, max_concurrent=4, tier=request.param)
    if ex.decision.tier is None:
        pytest.skip(f"{request.param} unavailable here: {ex.decision.reason}")
    return ex


@pytest.fixture
def marker() -> str:
    return jobs.new_marker()


@pytest.fixture
def work(base: Path) -> Path:
    return base / uuid.uuid4().hex


def cgroup_leftovers(facts: HostFacts) -> list[str]:
    bases = [b for _c, b in facts.cgroups.v1_bases] + [facts.cgroups.v2_base or ""]
    prefix = f"coop-{os.getpid()}-"
    return [str(p) for b in bases if b for p in Path(b).iterdir() if p.name.startswith(prefix)]


def assert_clean(marker: str, facts: HostFacts) -> None:
    assert jobs.leftovers(marker) == []
    assert cgroup_leftovers(facts) == []


async def run(executor: Executor, work: Path, command: tuple[str, ...], **kw: object) -> ExecResult:
    limits = {"wall_seconds": 20.0, "kill_grace_seconds": 0.2, **kw.pop("limits", {})}  # type: ignore[dict-item]
    spec = ExecSpec(command=command, work_dir=work, limits=Limits(**limits), **kw)  # type: ignore[arg-type]
    return await executor.run(spec)


async def test_network_is_unreachable(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    with trio.fail_after(20), socket.socket() as listener, socket.socket(type=socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        ports = (str(listener.getsockname()[1]), str(udp.getsockname()[1]))
        result = await run(executor, work, jobs.py(jobs.NET, marker, *ports))
        assert result.termination is Termination.EXITED, result
        out = result.stdout.decode()
        assert out.startswith("tcp:"), result
        assert "udp:" in out, result
        assert "dns:" in out, result
        assert "connected" not in out
        assert "udp:sent" not in out
        assert "resolved" not in out
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's listener
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    assert_clean(marker, facts)


async def test_cannot_write_outside_work_dir(executor: Executor, work: Path, marker: str, base: Path, facts) -> None:
    host_dir = base / f"host-{marker}"
    host_dir.mkdir(mode=0o777)
    host_dir.chmod(0o777)  # only the sandbox stands in the way, not file permissions
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.WRITE_OUTSIDE, marker, str(host_dir)))
    assert result.termination is Termination.EXITED, result
    name = f"escape-{marker}"
    assert f"blocked {host_dir}/{name}" in result.stdout.decode(), result
    for path in (host_dir / name, Path("/tmp") / name, Path("/") / name, Path("/usr") / name, base / name):
        assert not path.exists(), path
    assert_clean(marker, facts)


async def test_cannot_read_node_key_or_home(executor: Executor, work: Path, marker: str, base: Path, facts) -> None:
    data_dir = base / f"coop-home-{marker}"
    data_dir.mkdir(mode=0o755)
    key = data_dir / "key"
    key.write_text(f"SECRET-{marker}")
    key.chmod(0o644)  # readable by anyone: only the sandbox hides it
    home = os.environ.get("HOME", "/root")
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.READ_SECRETS, marker, str(key), str(data_dir), home))
    out = result.stdout.decode()
    assert f"blocked {key}" in out, result
    assert f"blocked {data_dir}" in out, result
    assert f"blocked {home}" in out, result
    assert "SECRET" not in out
    assert_clean(marker, facts)


async def test_seccomp_filter(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.SECCOMP, marker))
    out = result.stdout.decode()
    for call in ("unshare", "ptrace", "io_uring"):
        assert f"{call} Operation not permitted" in out, result
    assert "netlink Address family not supported" in out, result
    assert "unix ok" in out, result


async def test_cpu_spin_hits_cpu_limit(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.CPU_SPIN, marker), limits={"cpu_seconds": 0.5})
    assert result.termination is Termination.CPU_LIMIT, result
    assert 0.4 <= result.usage.cpu_seconds < 3
    assert_clean(marker, facts)


async def test_memory_hog(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.MEMORY_HOG, marker), limits={"memory_bytes": 64 * MIB})
    if "memory" in executor.cgroups.usable_controllers():
        assert result.termination is Termination.MEMORY_LIMIT, result
        assert result.usage.peak_memory_bytes <= 64 * MIB
    else:  # RLIMIT_AS only: the job sees MemoryError and exits on its own
        assert result.exit_status not in (0, None), result
    assert_clean(marker, facts)


async def test_fork_bomb(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    limits = {"max_processes": 16, "wall_seconds": 1.0, "cpu_seconds": 30.0}
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.FORK_BOMB, marker), limits=limits)
    assert result.termination is Termination.WALL_TIMEOUT, result
    assert_clean(marker, facts)


async def test_output_flood(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    seen = bytearray()

    async def on_output(_stream: str, chunk: bytes) -> None:
        seen.extend(chunk)

    with trio.fail_after(20):
        spec = ExecSpec(
            command=jobs.py(jobs.OUTPUT_FLOOD, marker), work_dir=work, limits=Limits(output_bytes=64 * 1024)
        )
        result = await executor.run(spec, on_output=on_output)
    assert result.termination is Termination.OUTPUT_LIMIT, result
    assert len(result.stdout) + len(result.stderr) == 64 * 1024
    assert bytes(seen) == result.stdout + result.stderr  # streamed as it came, within the cap
    assert_clean(marker, facts)


@pytest.mark.parametrize("code", [jobs.DISK_ONE_FILE, jobs.DISK_MANY_FILES], ids=["one-file", "many-files"])
async def test_disk_fill(executor: Executor, work: Path, marker: str, code: str, facts: HostFacts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(code, marker), limits={"disk_bytes": MIB})
    assert result.termination is Termination.DISK_LIMIT, result
    assert_clean(marker, facts)


async def test_setsid_grandchild_does_not_survive(executor: Executor, work: Path, marker: str, facts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.sh(jobs.GRANDCHILD, marker))
    assert result.termination is Termination.EXITED, result
    assert result.exit_status == 0, result
    assert result.stdout == b"started\n"
    assert_clean(marker, facts)


async def test_sigterm_ignored_past_timeout(executor: Executor, work: Path, marker: str, facts) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(jobs.IGNORE_TERM, marker), limits={"wall_seconds": 0.5})
    assert result.termination is Termination.WALL_TIMEOUT, result
    assert result.stdout == b"ready\n"
    assert 0.5 <= result.usage.wall_seconds < 5
    assert_clean(marker, facts)


async def test_cancel_mid_run(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    scope = trio.CancelScope()

    async def on_output(_stream: str, chunk: bytes) -> None:
        if b"ready" in chunk:
            scope.cancel()

    with trio.fail_after(20):
        spec = ExecSpec(command=jobs.py(jobs.SLEEPER, marker), work_dir=work)
        result = await executor.run(spec, on_output=on_output, cancel_scope=scope)
    assert result.termination is Termination.CANCELLED, result
    assert_clean(marker, facts)


async def test_outer_cancellation_kills_the_job(executor: Executor, work: Path, marker: str, facts) -> None:
    with trio.fail_after(20), trio.CancelScope() as outer:

        async def on_output(_stream: str, _chunk: bytes) -> None:
            outer.cancel()

        await executor.run(ExecSpec(command=jobs.py(jobs.SLEEPER, marker), work_dir=work), on_output=on_output)
    assert outer.cancelled_caught
    assert executor.statistics().running == 0
    assert_clean(marker, facts)


async def test_inputs_and_outputs(executor: Executor, work: Path, marker: str, facts: HostFacts) -> None:
    data, blob = b"hello coop\n", os.urandom(100_000)
    spec = ExecSpec(
        command=jobs.py(jobs.IO_JOB, marker),
        work_dir=work,
        inputs=(InputFile(name="data.txt", data=data), InputFile(name="nested/blob.bin", data=blob)),
        outputs=("out/upper.txt", "out/blob.rev", "leak", "never-written"),
    )
    with trio.fail_after(20):
        result = await executor.run(spec)
    assert result.termination is Termination.EXITED, result
    assert result.exit_status == 0, result
    got = {o.name: (o.sha256, o.size) for o in result.outputs}
    assert got == {
        "out/upper.txt": (hashlib.sha256(data.upper()).hexdigest(), len(data)),
        "out/blob.rev": (hashlib.sha256(blob[::-1]).hexdigest(), len(blob)),
    }
    assert result.missing_outputs == ("leak", "never-written")  # a symlink is never followed


async def test_python_workload(executor: Executor, work: Path, marker: str) -> None:
    numbers = " ".join(str(i * 7) for i in range(1000))
    spec = ExecSpec(
        command=jobs.py(jobs.WORKLOAD, marker),
        work_dir=work,
        inputs=(InputFile(name="numbers.txt", data=numbers.encode()),),
    )
    with trio.fail_after(20):
        result = await executor.run(spec)
    assert result.termination is Termination.EXITED, result
    assert result.exit_status == 0, result
    assert json.loads(result.stdout) == jobs.expected_workload(numbers)
    assert result.usage.cpu_seconds > 0
    assert result.usage.wall_seconds > 0
    assert result.usage.peak_memory_bytes > 0


async def test_command_not_found(executor: Executor, work: Path) -> None:
    with trio.fail_after(20):
        result = await run(executor, work, ("/no/such/command",))
    assert result.termination is Termination.EXITED, result
    assert result.exit_status == 127, result


async def test_env_reaches_the_job_but_no_command_line(executor: Executor, work: Path, marker: str) -> None:
    secret = f"token-{uuid.uuid4().hex}"
    scope = trio.CancelScope()
    exposed: list[str] = []

    async def on_output(_stream: str, chunk: bytes) -> None:
        if b"ready" in chunk:
            for p in psutil.process_iter(["cmdline"]):
                if any(secret in arg for arg in p.info["cmdline"] or []):
                    exposed.append(" ".join(p.info["cmdline"]))
            scope.cancel()

    code = "import os, time\nprint(os.environ['TOKEN'])\nprint('ready', flush=True)\ntime.sleep(60)"
    spec = ExecSpec(command=jobs.py(code, marker), work_dir=work, env={"TOKEN": secret})
    with trio.fail_after(20):
        result = await executor.run(spec, on_output=on_output, cancel_scope=scope)
    assert result.stdout.startswith(f"{secret}\n".encode()), result
    assert exposed == []  # not in bwrap's or the launcher's argv, which any local user can read


async def test_a_job_outlives_the_worker_thread_that_started_it(
    executor: Executor, work: Path, marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox dies with the *thread* that forked it (PDEATHSIG, bwrap --die-with-parent). trio's
    `open_process` forks in a worker thread, and an idle worker exits after 10 s: jobs then died after ~10 s as
    "sandbox-error" (seen under load in CI). Worker threads here idle out after 50 ms; the job must run on."""
    from trio._core import _thread_cache  # the idle timeout is private; shortening it is the fault injected

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.05)
    code = "import time\nprint('ready', flush=True)\ntime.sleep(1.5)\nprint('done', flush=True)"
    with trio.fail_after(20):
        result = await run(executor, work, jobs.py(code, marker))
    assert (result.termination, result.exit_status) == (Termination.EXITED, 0), result
    assert result.stdout == b"ready\ndone\n", result
