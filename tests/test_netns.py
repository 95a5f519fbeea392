"""scripts/netns.py: namespaces joined by a bridge, the API network from the root namespace, partition and heal,
removal of everything (also a crashed run's leftovers), and a clear refusal without CAP_NET_ADMIN."""

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.netns import Netns, namespaces, prefix_for, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
PORT = 7399
SERVE = f"""
import socket
s = socket.create_server(("0.0.0.0", {PORT}))
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""
PROBE = (
    "import socket, sys; s = socket.socket(); s.settimeout(0.5); print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
)


@pytest.fixture(scope="module")
def netns_ok():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")


def links_named(text):
    return [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
            if text in line]  # fmt: skip


def reaches(argv_prefix, host):
    """Whether a TCP connect from (inside ``argv_prefix``) to ``host``:PORT succeeds within 0.5 s."""
    out = subprocess.run([*argv_prefix, sys.executable, "-c", PROBE, host, str(PORT)], capture_output=True,
                         text=True, timeout=30, check=True).stdout  # fmt: skip
    return out.strip() == "0"


def test_bridge_api_network_partition_heal_and_removal(tmp_path, netns_ok):
    prefix = prefix_for(str(tmp_path))
    network = Netns.create(prefix, 4)
    servers = []
    try:
        assert sorted(namespaces(prefix)) == sorted([f"{prefix}-hub"] + [f"{prefix}-n{i}" for i in range(4)])
        nodes = [network.node(i) for i in range(4)]
        assert [n.address for n in nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4"]
        for node in nodes:
            server = subprocess.Popen(node.wrap([sys.executable, "-c", SERVE]), stdout=subprocess.PIPE, text=True)
            servers.append(server)
            assert server.stdout.readline() == "listening\n"
        inside = [node.wrap([]) for node in nodes]

        # one bridge: everyone reaches everyone; the root namespace reaches each node's API address
        assert reaches(inside[0], nodes[3].address)
        assert reaches(inside[3], nodes[0].address)
        assert all(reaches([], node.api_host) for node in nodes)

        network.partition([[0, 1], [2, 3]])
        assert reaches(inside[0], nodes[1].address)
        assert reaches(inside[2], nodes[3].address)
        assert not reaches(inside[0], nodes[2].address)
        assert not reaches(inside[3], nodes[1].address)
        assert all(reaches([], node.api_host) for node in nodes)  # the harness still sees both halves

        network.heal()
        assert reaches(inside[0], nodes[2].address)
        assert reaches(inside[3], nodes[1].address)
    finally:
        for server in servers:
            server.kill()
            server.wait()
            server.stdout.close()
        network.destroy()
    assert namespaces(prefix) == []
    assert links_named(network.root_link) == []

    # a crashed run's leftovers (same prefix) are removed by the next create
    leftover = Netns.create(prefix, 2)
    again = Netns.create(prefix, 1)
    try:
        assert sorted(namespaces(prefix)) == [f"{prefix}-hub", f"{prefix}-n0"]
        assert leftover.root_link == again.root_link
        assert len(links_named(again.root_link)) == 1
    finally:
        again.destroy()
    assert namespaces(prefix) == []


def test_without_cap_net_admin_up_netns_says_why_and_starts_nothing(tmp_path):
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, str(REPO / "scripts" / "cluster.py"),
         "up", "2", "--netns", "--base", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert "--netns: cannot create a network namespace (needs root or CAP_NET_ADMIN)" in result.stderr
    assert not (tmp_path / "c" / "node0" / "log").exists()
