"""scripts/cluster.py as a user runs it: `up`, `status`, `down`, with several bootstrap seeds."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def cluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "cluster.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip


def test_up_with_seeds_status_and_down(tmp_path):
    base = str(tmp_path / "c")
    try:
        up = cluster("up", "4", "--seeds", "2", "--base", base)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "c" / "cluster.json").read_text())
        nodes = {n["name"]: n for n in state["nodes"]}
        assert [n["provides"] for n in state["nodes"]] == [True, True, True, False]  # the last one is the client

        def bootstrap_of(name: str) -> set[str]:
            argv = Path(f"/proc/{nodes[name]['pid']}/cmdline").read_bytes().split(b"\0")
            return {argv[i + 1].decode() for i, arg in enumerate(argv) if arg == b"--bootstrap"}

        def joined(name: str) -> set[str]:
            log = (tmp_path / "c" / name / "log").read_text()
            return {
                line.split()[-1] for line in log.splitlines() if line.startswith("coop: joined the network through")
            }

        seeds = {nodes["node0"]["address"], nodes["node1"]["address"]}
        assert bootstrap_of("node0") == set()
        assert bootstrap_of("node1") == {nodes["node0"]["address"]}  # the second seed joins through the first
        assert bootstrap_of("node2") == bootstrap_of("node3") == seeds  # later nodes join through two seeds each
        seed_ids = {nodes["node0"]["peer_id"], nodes["node1"]["peer_id"]}
        deadline = time.monotonic() + 60
        while joined("node3") != seed_ids:  # a node is ready before its joins are done
            assert time.monotonic() < deadline, joined("node3")
            time.sleep(0.2)  # ok: polling another process's log file

        status = cluster("status", "--base", base)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" alive ") == 4
    finally:
        down = cluster("down", "--base", base)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 4 node(s)" in down.stdout
    status = cluster("status", "--base", base)
    assert status.returncode == 1  # every node is dead now
    assert status.stdout.count(" dead ") == 4
