"""The hostile jobs again, with the daemon itself running as an unprivileged user (uid 65534).

No cgroup is writable then on hosts like the project's (hybrid, root-owned), so this also covers the fallbacks:
sampled metering, RLIMIT_AS for memory, and the PID-namespace wait instead of an empty cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.fixtures.sandbox import jobs

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "fixtures" / "sandbox" / "unprivileged_runner.py"
NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def _as_nobody(*argv: str) -> list[str]:
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


def _skip_reason() -> str | None:
    if os.getuid() != 0:
        return "needs root to start a process as uid 65534"
    if SETPRIV is None:
        return "setpriv (util-linux) is not installed"
    imports = "import trio, node.sandbox.executor, tests.fixtures.sandbox.jobs"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {imports}"
    probe = subprocess.run(_as_nobody(sys.executable, "-c", code), capture_output=True, text=True, cwd="/", check=False)
    if probe.returncode != 0:
        return f"uid {NOBODY} cannot run this Python and checkout: {probe.stderr.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def lines() -> Iterator[dict[str, dict[str, object]]]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="coop-sbx-nobody-"))
    os.chown(base, NOBODY, NOBODY)
    try:
        out = trio.run(_run_runner, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {obj["job"]: obj for obj in map(json.loads, out.splitlines())}


async def _run_runner(base: Path) -> str:
    with trio.fail_after(60):
        done = await trio.run_process(
            _as_nobody(sys.executable, str(RUNNER), str(ROOT), str(base)), capture_stdout=True, capture_stderr=True,
            check=False, cwd="/",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode()


def test_runs_unprivileged_in_a_sandbox(lines: dict[str, dict[str, object]]) -> None:
    facts = lines["facts"]
    assert facts["uid"] == NOBODY
    assert facts["tier"] in ("bwrap", "landlock"), facts["reason"]


def test_every_job_left_nothing_running(lines: dict[str, dict[str, object]]) -> None:
    jobs_run = [v for k, v in lines.items() if "leftovers" in v]
    assert len(jobs_run) == 11
    assert all(v["leftovers"] == [] for v in jobs_run), jobs_run
    assert jobs.leftovers("coop-test-") == []  # nor anything from the runner's jobs now that it is gone


def test_network_and_files(lines: dict[str, dict[str, object]]) -> None:
    net = str(lines["net"]["stdout"])
    assert net.startswith("tcp:")
    assert "connected" not in net
    assert "udp:sent" not in net
    assert "resolved" not in net
    assert lines["net-host-side"]["reached"] == []
    assert lines["write-host-side"]["files"] == []
    assert "blocked" in str(lines["write"]["stdout"])
    secrets = str(lines["secrets"]["stdout"])
    assert "SECRET" not in secrets
    assert secrets.count("blocked") == 2


def test_limits_and_kills(lines: dict[str, dict[str, object]]) -> None:
    def reason(name: str) -> object:
        return lines[name]["termination"]

    assert reason("cpu") == "cpu-limit"
    if "memory" in lines["facts"]["cgroups"]:  # type: ignore[operator]
        assert reason("memory") == "memory-limit"
    else:  # RLIMIT_AS only: allocation fails inside the job, which exits on its own
        assert lines["memory"]["exit_status"] not in (0, None)
        assert "MemoryError" in str(lines["memory"]["stderr"])
    assert reason("forkbomb") == "wall-timeout"
    assert reason("flood") == "output-limit"
    assert lines["flood"]["output_bytes"] == 65536
    assert reason("disk") == "disk-limit"
    assert reason("grandchild") == "exited"
    assert lines["grandchild"]["stdout"] == "started\n"
    assert reason("sigterm") == "wall-timeout"
    assert reason("cancel") == "cancelled"
