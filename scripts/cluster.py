#!/usr/bin/env python3
"""A local Coop cluster: N `node start` processes on 127.0.0.1, to try by hand and for benchmarks and tests.

Usage, from the repository root: ``scripts/cluster.py up 3`` (node0..node2 under .coop-cluster/), then ``status``
or ``down``. The nodes run under this same Python; started by another one, this re-runs itself under .venv's.
``up N --netns`` puts each node in a network namespace of its own (scripts/netns.py: root or CAP_NET_ADMIN), its
libp2p address on a bridge (10.77.0.0/16) and its API on a separate bridge reachable from here (10.78.K.0/24).

Theory of operation: node I's data dir is DIR/nodeI/, with a config.toml that listens on port 0 (libp2p and API)
and refreshes its capacity ad every 5 s (1 s with ``--fast``, as the tests do). Node 0 starts first; the others
bootstrap from it, all at once. A node has started when its log (DIR/nodeI/log: stdout and stderr) says
``coop: ready``. The nodes run in sessions of their own, so they outlive ``up``; DIR/cluster.json records what
``status`` and ``down`` need (pids, peer ids, addresses, data dirs). By default the last node is a client
(``--no-provide``); ``--providers-only`` makes every node a provider, ``--first-client`` makes node 0 the client.

From Python (imports only the standard library; ``client()`` and ``wait_discovery()`` import ``node.client``):
``with Cluster.start(3, base=path, clients={2}) as cluster: cluster.client(2).submit(["true"])``.

What a node is (its config.toml, environment and command line, :func:`node_config`, :func:`node_env`,
:func:`node_argv`) is defined here once: tests/cluster.py (the trio harness of the tests) builds on these, so
tests, benchmarks and this script start nodes the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if not __package__:  # run as scripts/cluster.py: make `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.netns import Netns, NetnsError, NodeNet, prefix_for

if TYPE_CHECKING:
    from node.client import Client

REPO: Final = Path(__file__).resolve().parents[1]
DEFAULT_BASE: Final = Path(".coop-cluster")  # git-ignored by /.coop-*/
STATE_FILE: Final = "cluster.json"
READY_TIMEOUT_S: Final = 60.0
DISCOVERY_TIMEOUT_S: Final = 30.0
STOP_GRACE_S: Final = 10.0
POLL_S: Final = 0.05
FAKE_NVML: Final = {"gpus": [{"model": "NVIDIA GeForce RTX 4090", "memory_bytes": 25757220864}]}

CONFIG: Final = """\
[network]
listen = ["/ip4/{host}/tcp/0"]
bootstrap_retry_max_seconds = 2
[api]
listen = "{api_host}:0"
[provide]
ad_refresh_seconds = {refresh}
ad_ttl_seconds = {ttl}
clock_skew_seconds = {skew}
"""


def node_config(
    *,
    refresh: float,
    ttl: float,
    skew: float = 2,
    host: str = "127.0.0.1",
    api_host: str = "127.0.0.1",
    per_cpu_second: int | None = None,
    sync_interval: float | None = None,
) -> str:
    """A harness node's config.toml: ports 0, fast bootstrap retry, the given ad cadence; optional sections.

    Args:
        host: the libp2p listen address (a netns node's ``eth0`` address), api_host: the API's.
        per_cpu_second: ``[pricing] per_cpu_second`` if given; sync_interval: ``[trust] sync_interval_seconds``.
    """
    text = CONFIG.format(refresh=refresh, ttl=ttl, skew=skew, host=host, api_host=api_host)
    if per_cpu_second is not None:
        text += f"[pricing]\nper_cpu_second = {per_cpu_second}\n"
    if sync_interval is not None:
        text += f"[trust]\nsync_interval_seconds = {sync_interval}\n"
    return text


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``COOP_*`` (so no outer setting leaks in), unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COOP_")}
    return env | {"PYTHONUNBUFFERED": "1", **(extra or {})}


def node_argv(
    data_dir: Path,
    *,
    bootstrap: Collection[str] = (),
    provides: bool = True,
    extra_args: Collection[str] = (),
    program: list[str] | None = None,
    net: NodeNet | None = None,
) -> list[str]:
    """The command line of ``node start`` for a harness node (inside ``net``'s namespace when given)."""
    argv = [*(program or [sys.executable, "-m", "node"]), "start", "--data-dir", str(data_dir)]
    argv += [arg for address in bootstrap for arg in ("--bootstrap", address)]
    argv += ([] if provides else ["--no-provide"]) + list(extra_args)
    return net.wrap(argv) if net else argv


class ClusterError(Exception):
    """A node did not start, or there is no cluster where one was expected. The message says which and why."""


@dataclass(slots=True, kw_only=True)
class NodeInfo:
    """One node; ``pid``, ``peer_id``, ``address`` (of libp2p) and ``api_url`` are known once it is ready."""

    name: str
    data_dir: Path
    provides: bool
    fake_gpu: bool = False
    netns: str = ""  # the namespace it runs in (``--netns``), with its libp2p and API addresses there
    host: str = "127.0.0.1"
    api_host: str = "127.0.0.1"
    pid: int = 0
    peer_id: str = ""
    address: str = ""
    api_url: str = ""

    def alive(self) -> bool:
        """Whether ``pid`` is still this node (not a process that reused the pid since)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return self.pid > 0 and state != "Z" and str(self.data_dir).encode() in cmdline

    def spawn(self, *, bootstrap: Collection[str], fast: bool) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        refresh, ttl = (1, 3) if fast else (5, 15)
        config = node_config(refresh=refresh, ttl=ttl, host=self.host, api_host=self.api_host)
        (self.data_dir / "config.toml").write_text(config)
        env = node_env({"COOP_FAKE_NVML": json.dumps(FAKE_NVML)} if self.fake_gpu else {})
        net = NodeNet(self.netns, self.host, self.api_host) if self.netns else None
        argv = node_argv(self.data_dir, bootstrap=bootstrap, provides=self.provides, net=net)
        with (self.data_dir / "log").open("wb") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                start_new_session=True,  # Ctrl-C in this terminal is not for it, and it outlives `up`
            )  # fmt: skip
        self.pid = process.pid
        return process

    def check_ready(self, process: subprocess.Popen[bytes]) -> bool:
        """True once the log says ``coop: ready`` (and fill in what it printed); ClusterError if it exited first."""
        lines = (self.data_dir / "log").read_text(errors="replace").splitlines()
        if "coop: ready" not in lines:
            if process.poll() is not None:
                tail = "\n".join(lines[-20:])
                raise ClusterError(f"{self.name} exited with status {process.returncode} before it was ready:\n{tail}")
            return False
        self.peer_id = next(line.split()[-1] for line in lines if line.startswith("coop: peer id "))
        self.address = next(line.split()[-1] for line in lines if line.startswith("coop: listening on "))
        self.api_url = json.loads((self.data_dir / "api.json").read_text())["url"]
        return True


class Cluster:
    """A local cluster: build one with :meth:`start`, or :meth:`load` the one that ``up`` recorded."""

    def __init__(self, base: Path, nodes: list[NodeInfo], netns: Netns | None = None) -> None:
        self.base = base
        self.nodes = nodes
        self.netns = netns  # the namespaces of a ``--netns`` cluster, removed by stop()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}  # the nodes this process started

    @classmethod
    def start(cls, n: int, *, base: Path = DEFAULT_BASE, clients: Collection[int] = (), gpus_fake: int = 0,
              fast: bool = False, timeout: float = READY_TIMEOUT_S, netns: bool = False,
              seeds: int = 1) -> Cluster:  # fmt: skip
        """Start ``n`` nodes; return once all are ready. On any failure, or Ctrl-C, stop those started.

        Args:
            base: the cluster's dir (node I's data dir is ``base/nodeI``, kept, so peer ids stay the same).
            clients: indices of the nodes started with ``--no-provide``.
            gpus_fake: the first ``gpus_fake`` nodes see one fake RTX 4090 (``COOP_FAKE_NVML``).
            fast: refresh ads every 1 s with a ttl of 3 s (the tests' cadence) instead of 5 s and 15 s.
            netns: each node in a network namespace of its own (scripts/netns.py), named from ``base``'s path.
            seeds: the first ``seeds`` nodes start first (node 0, then the others from it); every later node
                bootstraps from two of them, in turn, so no single node takes every join at once.

        Raises:
            ClusterError: a cluster is already up in ``base``; a node exited, or was not ready in time; the
                namespaces could not be built (e.g. without root or CAP_NET_ADMIN).
        """
        base = base.resolve()
        if (base / STATE_FILE).exists() and any(node.alive() for node in cls.load(base).nodes):
            raise ClusterError(f"a cluster is already up in {base}; stop it first (scripts/cluster.py down)")
        nodes = [
            NodeInfo(name=f"node{i}", data_dir=base / f"node{i}", provides=i not in clients, fake_gpu=i < gpus_fake)
            for i in range(n)
        ]
        cluster = cls(base, nodes)
        try:
            if netns:
                cluster.netns = _create_netns(base, n)
                for i, node in enumerate(nodes):
                    net = cluster.netns.node(i)
                    node.netns, node.host, node.api_host = net.namespace, net.address, net.api_host
            seeds = max(1, min(seeds, n))
            cluster._start(nodes[:1], bootstrap=[], fast=fast, timeout=timeout)
            cluster._start(nodes[1:seeds], bootstrap=[nodes[0].address], fast=fast, timeout=timeout)
            addresses = [node.address for node in nodes[:seeds]]
            pick = (
                (lambda i: [addresses[i % seeds], addresses[(i + 1) % seeds]]) if seeds > 1 else (lambda i: addresses)
            )
            cluster._start(nodes[seeds:], bootstrap=pick, fast=fast, timeout=timeout)
            cluster.save()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(
        self,
        nodes: list[NodeInfo],
        *,
        bootstrap: list[str] | Callable[[int], list[str]],
        fast: bool,
        timeout: float,
    ) -> None:
        """Spawn ``nodes`` (bootstrapping from ``bootstrap``, or ``bootstrap(i)`` for the i-th) and wait until
        all are ready."""
        for i, node in enumerate(nodes):
            addresses = bootstrap(i) if callable(bootstrap) else bootstrap
            self._processes[node.name] = node.spawn(bootstrap=addresses, fast=fast)
        deadline = time.monotonic() + timeout
        pending = [node for node in nodes if not node.check_ready(self._processes[node.name])]
        while pending:
            if time.monotonic() > deadline:
                raise ClusterError(f"not ready after {timeout:.0f} s: {', '.join(n.name for n in pending)}")
            time.sleep(POLL_S)  # the log is a file another process writes: nothing to block on
            pending = [node for node in pending if not node.check_ready(self._processes[node.name])]

    @classmethod
    def load(cls, base: Path = DEFAULT_BASE) -> Cluster:
        """The cluster recorded in ``base/cluster.json``. Raises ClusterError if there is none."""
        try:
            state = json.loads((base / STATE_FILE).read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {base} (start one with scripts/cluster.py up N)") from None
        fields = NodeInfo.__dataclass_fields__
        nodes = [NodeInfo(**{k: v for k, v in node.items() if k in fields} | {"data_dir": Path(node["data_dir"])})
                 for node in state["nodes"]]  # fmt: skip
        netns = Netns(**state["netns"]) if state.get("netns") else None
        return cls(Path(state["base"]), nodes, netns)

    def save(self) -> None:
        nodes = [asdict(node) | {"data_dir": str(node.data_dir)} for node in self.nodes]
        state = {"base": str(self.base), "nodes": nodes, "netns": asdict(self.netns) if self.netns else None}
        (self.base / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def stop(self, *, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every node, wait up to ``grace`` s, then SIGKILL the rest; then remove the cluster's namespaces.

        Keeps cluster.json and the data dirs.
        """
        for node in self.nodes:
            if node.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while True:
            for process in self._processes.values():
                process.poll()  # reap our own children, or they would linger as zombies
            left = [node for node in self.nodes if node.alive()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)  # after `up`, these are not our children: there is no wait() to block on
        for node in left:
            print(f"{node.name} (pid {node.pid}) ignored SIGTERM for {grace:.0f} s: killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # a session leader: its group holds its job processes
        for process in self._processes.values():
            process.wait()
        if self.netns is not None:
            self.netns.destroy()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, index: int) -> Client:
        """A ``node.client.Client`` of node ``index``'s local API."""
        from node.client import Client

        return Client.from_data_dir(self.nodes[index].data_dir)

    def wait_discovery(self, index: int, *, timeout: float = DISCOVERY_TIMEOUT_S) -> bool:
        """Wait until node ``index`` finds every provider in the cluster; False if not within ``timeout``."""
        wanted = {node.peer_id for node in self.nodes if node.provides}
        deadline = time.monotonic() + timeout
        with self.client(index) as client:
            while {p["peer_id"] for p in client.find(cpus=1) + client.find(gpus=1)} < wanted:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.25)  # ads spread through other processes' DHT: poll
        return True


def _create_netns(base: Path, n: int) -> Netns:
    try:
        return Netns.create(prefix_for(str(base)), n)
    except NetnsError as exc:
        raise ClusterError(f"--netns: {exc}") from exc


def _shown(path: Path) -> str:
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def _table(cluster: Cluster) -> None:
    print(f"{'node':<7}{'role':<22}{'state':<7}{'pid':>8}  {'peer id':<54}api")
    for node in cluster.nodes:
        role = ("provider" if node.provides else "client") + (" (fake GPU)" if node.fake_gpu else "")
        state = "alive" if node.alive() else "dead"
        print(f"{node.name:<7}{role:<22}{state:<7}{node.pid:>8}  {node.peer_id:<54}{node.api_url}")
    if cluster.netns is not None:
        net = cluster.netns
        print(f"\nnetns: node I in {net.prefix}-nI (libp2p on 10.77.0.I+1), bridges in {net.prefix}-hub; "
              f"APIs on 10.78.{net.mgmt_subnet}.0/24 via {net.root_link}")  # fmt: skip


def cmd_up(args: argparse.Namespace) -> int:
    clients = set() if args.providers_only or args.n == 1 else {0 if args.first_client else args.n - 1}
    cluster = Cluster.start(
        args.n,
        base=args.base,
        clients=clients,
        gpus_fake=args.gpus_fake,
        fast=args.fast,
        netns=args.netns,
        seeds=args.seeds,
    )
    user = min(clients, default=args.n - 1)
    if not cluster.wait_discovery(user):
        print(f"warning: node{user} does not see every provider yet; give it a few seconds", file=sys.stderr)
    _table(cluster)
    data_dir, base = _shown(cluster.nodes[user].data_dir), _shown(cluster.base)
    print(f"\nbootstrap: {cluster.nodes[0].address}\nstate:     {base}/{STATE_FILE}; logs: {base}/nodeI/log\n")
    print(f"  .venv/bin/coop find   --data-dir {data_dir} --cpus 1")
    print(f"  .venv/bin/coop submit --data-dir {data_dir} -- echo hello")
    print(f'  python: Client.from_data_dir(Path("{data_dir}")).submit(["echo", "hello"]).result()')
    print(f"  stop:   scripts/cluster.py down{f' --base {base}' if args.base != DEFAULT_BASE else ''}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _table(cluster := Cluster.load(args.base))
    return 0 if all(node.alive() for node in cluster.nodes) else 1


def cmd_down(args: argparse.Namespace) -> int:
    (cluster := Cluster.load(args.base)).stop()
    print(f"stopped {len(cluster.nodes)} node(s); their data dirs are kept under {_shown(cluster.base)}")
    if cluster.netns is not None:
        print(f"removed the network namespaces {cluster.netns.prefix}-*")
    return 0


def main(argv: list[str] | None = None) -> int:
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists() and not all(importlib.util.find_spec(m) for m in ("anyio", "libp2p", "trio")):  # not the venv's
        os.execv(venv, [str(venv), __file__, *(sys.argv[1:] if argv is None else argv)])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N nodes and wait until they are ready")
    up.add_argument("n", type=int, metavar="N", help="number of nodes (at least 1)")
    roles = up.add_mutually_exclusive_group()
    roles.add_argument("--providers-only", action="store_true", help="every node provides (default: last is a client)")
    roles.add_argument("--first-client", action="store_true", help="node 0 is the client instead of the last node")
    up.add_argument("--gpus-fake", type=int, default=0, metavar="K", help="one fake GPU on each of the first K nodes")
    up.add_argument("--fast", action="store_true", help="ads every 1 s, ttl 3 s (as the tests); default 5 s / 15 s")
    up.add_argument("--netns", action="store_true", help="each node in its own network namespace (needs root)")
    up.add_argument("--seeds", type=int, default=1, metavar="S",
                    help="each later node joins through two of the first S nodes (default 1: node 0)")  # fmt: skip
    up.set_defaults(handler=cmd_up)
    sub.add_parser("status", help="show each node alive or dead").set_defaults(handler=cmd_status)
    sub.add_parser("down", help="stop every node (SIGTERM, SIGKILL after 10 s), remove its namespaces").set_defaults(
        handler=cmd_down
    )
    for p in sub.choices.values():
        p.add_argument("--base", type=Path, default=DEFAULT_BASE, metavar="DIR", help="cluster dir (.coop-cluster)")
    args = parser.parse_args(argv)
    if args.command == "up" and args.n < 1:
        parser.error("up needs at least one node")
    try:
        return int(args.handler(args))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
