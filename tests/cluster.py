"""Real `node start` processes on 127.0.0.1 (or in network namespaces) for multi-process tests.

Each node gets its own data dir, a config with a fast ad cadence, port 0 for libp2p and the API, and is
considered started when it prints ``coop: ready`` (read from its stdout: no sleeping).

This is the trio face of the one harness: what a node is (config.toml, environment, command line) comes from
scripts/cluster.py (:func:`~scripts.cluster.node_config`, ``node_env``, ``node_argv``), and a node started with
``net=`` (a :class:`~scripts.netns.NodeNet` of an :func:`open_netns` network) runs in its own namespace, listening
on its bridge address, with its API on the harness's API network.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from scripts.cluster import node_argv, node_config, node_env
from scripts.netns import Netns, NodeNet, prefix_for


@dataclass
class NodeProcess:
    data_dir: Path
    env: dict[str, str]
    args: list[str]
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "node"])
    net: NodeNet | None = None  # run in this network namespace
    process: trio.Process | None = None
    lines: list[str] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return next(line.split()[-1] for line in self.lines if line.startswith("coop: peer id "))

    @property
    def address(self) -> str:
        return next(line.split()[-1] for line in self.lines if line.startswith("coop: listening on "))

    async def _pump(
        self, stream: trio.abc.ReceiveStream, lines: list[str], ready: trio.Event, exited: trio.Event
    ) -> None:
        # This run's own list and events: a restarted node's new run must not see the old run's end.
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                if line == "coop: ready":
                    ready.set()
        exited.set()

    async def start(self, nursery: trio.Nursery) -> None:
        self.ready = trio.Event()
        self.exited = trio.Event()
        self.lines = []
        cmd = node_argv(self.data_dir, extra_args=self.args, program=self.program, net=self.net)
        self.process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env
        )
        nursery.start_soon(self._pump, self.process.stdout, self.lines, self.ready, self.exited)
        async with trio.open_nursery() as race:

            async def ready() -> None:
                await self.ready.wait()
                race.cancel_scope.cancel()

            async def died() -> None:
                await self.exited.wait()
                raise RuntimeError("node exited before it was ready:\n" + "\n".join(self.lines))

            race.start_soon(ready)
            race.start_soon(died)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.process.wait()

    async def cli(self, *args: str) -> object:
        """Run `node ARGS --json --data-dir DIR` and parse its JSON output."""
        cmd = [sys.executable, "-m", "node", *args, "--json", "--data-dir", str(self.data_dir)]
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, env=self.env, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr.decode()}")
        return json.loads(result.stdout)

    def api_info(self) -> dict[str, str]:
        return json.loads((self.data_dir / "api.json").read_text())

    async def api(self, method: str, path: str, **kwargs: object) -> object:
        """Call the node's local API; return the JSON body (or raw bytes for non-JSON)."""
        info = self.api_info()
        headers = {"Authorization": f"Bearer {info['token']}"}
        async with httpx.AsyncClient(base_url=info["url"], headers=headers, trust_env=False, timeout=60) as http:
            response = await http.request(method, path, **kwargs)
        assert response.status_code < 300, (response.status_code, response.text)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    async def submit(self, command: list[str], **fields: object) -> str:
        body = {"command": command, "timeout": 60, "memory_bytes": 64 << 20, **fields}
        return (await self.api("POST", "/v1/jobs", json=body))["job_id"]

    async def wait_job(self, job_id: str, *, states=("completed", "failed", "cancelled")) -> dict:
        while True:
            job = await self.api("GET", f"/v1/jobs/{job_id}/wait", params={"timeout": 5})
            if job["state"] in states:
                return job


def make_node(
    base: Path,
    name: str,
    *,
    bootstrap: list[str] = (),
    refresh: float = 1,
    ttl: float = 3,
    skew: float = 0.5,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] = (),
    per_cpu_second: int = 10,
    sync_interval: float = 1,
    program: list[str] | None = None,
    net: NodeNet | None = None,
) -> NodeProcess:
    data_dir = base / name
    data_dir.mkdir(parents=True, exist_ok=True)
    hosts = {"host": net.address, "api_host": net.api_host} if net else {}
    config = node_config(
        refresh=refresh, ttl=ttl, skew=skew, per_cpu_second=per_cpu_second, sync_interval=sync_interval, **hosts
    )
    (data_dir / "config.toml").write_text(config)
    args = [arg for b in bootstrap for arg in ("--bootstrap", b)] + list(extra_args)
    program = program or [sys.executable, "-m", "node"]
    return NodeProcess(data_dir=data_dir, env=node_env(extra_env), args=args, program=program, net=net)


@contextlib.asynccontextmanager
async def open_netns(base: Path, size: int) -> AsyncIterator[Netns]:
    """Network namespaces for ``size`` nodes (scripts/netns.py), named from ``base``; removed on the way out.

    Pass ``net=network.node(i)`` to :func:`make_node` / :meth:`Launcher.make`. Stop the nodes first, or their
    namespaces outlive the removal until they exit. Raises ``NetnsError`` where namespaces cannot be made.
    """
    network = await trio.to_thread.run_sync(Netns.create, prefix_for(str(base)), size)
    try:
        yield network
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(network.destroy)


class Launcher:
    """Starts nodes in a nursery and kills whatever is still running when the test ends."""

    def __init__(self, base: Path, nursery: trio.Nursery) -> None:
        self.base = base
        self.nursery = nursery
        self.nodes: list[NodeProcess] = []

    def make(self, name: str, **kwargs: object) -> NodeProcess:
        node = make_node(self.base, name, **kwargs)  # type: ignore[arg-type]
        self.nodes.append(node)
        return node

    async def start(self, node: NodeProcess) -> None:
        await node.start(self.nursery)

    async def kill_all(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.returncode is None:
                node.process.kill()
                await node.process.wait()


async def wait_until(predicate, *, interval: float = 0.25):
    """Poll an async predicate until it returns a truthy value (the caller bounds time with fail_after)."""
    while True:
        value = await predicate()
        if value:
            return value
        await trio.sleep(interval)  # ok: polling another process's state, which offers nothing to await
