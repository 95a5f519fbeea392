"""Reputation gossip: time for a job's records to reach 50% / 99% of N nodes, and the pull path's catch-up time.

    .venv/bin/python scripts/bench/gossip.py [--sizes 10,30,50] [--repeats 3] [--catchup-jobs 5]

For each N, N ``node start`` processes (scripts/cluster.py; node N-1 is a ``--no-provide`` client). Their ads are
refreshed every 30 s (ttl 90 s) instead of the harness's 5 s, so that 50 processes on 2 cores are not kept busy by
DHT traffic; ``[trust] sync_interval_seconds`` stays 30 s. The harness has no option for either and writes each
config.toml from its ``CONFIG`` template at spawn, so this script swaps the template while nodes start.

- propagation, after a warm-up job, R times: the client runs ``true``; each run of it (the primary, and a replica
  when adaptive verification asks for one) leaves two records, one by each side. t0 is the client's ``updated_ms``
  of the completed job (all nodes share this machine's clock). From before the submission, every node's
  ``GET /v1/reputation`` is polled (all at once, 50 ms after each round) until ``statistics.records`` holds the new
  ones; a node's time is the middle of (last poll saying no sent, first saying yes answered], whose width is the
  resolution. Reported: when ceil(50%) and ceil(99%) of N nodes held them (99% is all of them for N < 100), and how
  the copies came (``accepted_by_gossip`` / ``pulled``, summed over the nodes).
- catch-up, once per N: node N-2 (a provider) is stopped, the client runs K jobs, and 10 s after the last (past
  GossipSub's 5 s message cache, which would replay them) the node restarts with ``sync_interval_seconds = 2``;
  measured: from its ``coop: ready`` until it holds every record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import scripts.cluster as harness
from node.client import AsyncClient
from scripts.cluster import Cluster, NodeInfo

AD_REFRESH_S, AD_TTL_S = 30, 90
SYNC_S, CATCHUP_SYNC_S = 30, 2  # the default, for propagation; the restarted node's, for catch-up
POLL_S = 0.05
DOWN_AFTER_S = 10.0
START_TIMEOUT_S = 900.0
JOB: dict[str, Any] = {"timeout": 30, "memory": "64MiB"}


@contextlib.contextmanager
def node_config(sync_s: float, refresh_s: float = AD_REFRESH_S, ttl_s: float = AD_TTL_S) -> Iterator[None]:
    """Nodes spawned meanwhile get slow ads and this sync interval (the harness formats ``CONFIG`` at spawn)."""
    original = harness.CONFIG
    text = original.replace("{refresh}", str(refresh_s)).replace("{ttl}", str(ttl_s))
    harness.CONFIG = text + f"[trust]\nsync_interval_seconds = {sync_s}\n"  # type: ignore[misc]
    try:
        yield
    finally:
        harness.CONFIG = original  # type: ignore[misc]


@contextlib.contextmanager
def progress(base: Path, n: int) -> Iterator[None]:
    """Print how many nodes are ready every 10 s while the harness starts them (it says nothing until all are)."""
    done, t = threading.Event(), time.monotonic()

    def report() -> None:
        while not done.wait(10):
            ready = sum("coop: ready\n" in p.read_text(errors="replace") for p in base.glob("node*/log"))
            print(f"  {time.monotonic() - t:4.0f} s: {ready}/{n} ready", flush=True)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def cpu_seconds(nodes: list[NodeInfo]) -> float:
    """User + system CPU seconds the node processes have used so far."""
    stats = (Path(f"/proc/{node.pid}/stat").read_text().rsplit(")", 1)[1].split() for node in nodes)
    return sum(int(f[11]) + int(f[12]) for f in stats) / os.sysconf("SC_CLK_TCK")


class Api:
    """Each node's local API over httpx, and what polling it cost."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.http: dict[str, httpx.AsyncClient] = {}
        self.round_s: list[float] = []  # each polling round of the pending nodes
        self.bracket_s: list[float] = []  # resolution: last poll saying no sent, to first saying yes answered
        self.cpu = [0.0, 0.0]  # this process's CPU seconds and wall seconds while polling
        for node in nodes:
            self.open(node)

    def open(self, node: NodeInfo) -> None:
        token = json.loads((node.data_dir / "api.json").read_text())["token"]
        headers = {"Authorization": f"Bearer {token}"}
        self.http[node.name] = httpx.AsyncClient(base_url=node.api_url, headers=headers, trust_env=False, timeout=30)

    async def aclose(self, name: str | None = None) -> None:
        for http in [self.http.pop(name)] if name else self.http.values():
            await http.aclose()

    async def get(self, name: str, path: str, **params: Any) -> Any:
        try:
            response = await self.http[name].get(path, params=params)
        except httpx.TransportError:  # hypercorn drops keep-alive connections idle for 5 s, racing our request
            response = await self.http[name].get(path, params=params)
        response.raise_for_status()
        return response.json()

    async def each(self, nodes: list[NodeInfo], path: str, **params: Any) -> dict[str, tuple[float, float, Any]]:
        """Ask every node at once; per node: when the request was sent, when answered, and the answer."""
        out: dict[str, tuple[float, float, Any]] = {}

        async def one(name: str) -> None:
            sent = time.time()
            answer = await self.get(name, path, **params)
            out[name] = (sent, time.time(), answer)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node.name)
        return out

    async def stats(self, nodes: list[NodeInfo]) -> dict[str, dict[str, Any]]:
        return {k: v[2]["statistics"] for k, v in (await self.each(nodes, "/v1/reputation", top=1)).items()}

    async def watch(
        self, nodes: list[NodeInfo], base: int, job: Callable[[], Awaitable[tuple[float, int]]], wait_s: float
    ) -> tuple[int, dict[str, float]]:
        """Poll every node's record count while ``job`` runs (it returns t0 and how many records it made on top of
        ``base``) and after; return that many, and when (seconds after t0) each node first held ``base`` + that
        many: the middle of (last poll saying no sent, first saying yes answered]. Missing: not in time."""
        timeline: dict[str, list[tuple[float, float, int]]] = {node.name: [] for node in nodes}
        target, until, pending = math.inf, math.inf, list(nodes)

        async def poll() -> None:
            nonlocal pending
            while pending and time.time() < until:
                t = time.monotonic()
                for name, (sent, answered, stats) in (await self.each(pending, "/v1/reputation", top=1)).items():
                    timeline[name].append((sent, answered, stats["statistics"]["records"]))
                self.round_s.append(time.monotonic() - t)
                pending = [node for node in pending if timeline[node.name][-1][2] < target]
                await trio.sleep(POLL_S)

        cpu, wall, k = time.process_time(), time.monotonic(), 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            t0, k = await job()
            target, until = base + k, t0 + wait_s
        self.cpu[0] += time.process_time() - cpu
        self.cpu[1] += time.monotonic() - wall
        got: dict[str, float] = {}
        for name, points in timeline.items():
            first = next((i for i, (_, _, records) in enumerate(points) if records >= target), None)
            if first is not None:
                low = points[max(first - 1, 0)][0]
                got[name] = (low + points[first][1]) / 2 - t0
                self.bracket_s.append(points[first][1] - low)
        return k, got


async def run_job(data_dir: Path) -> tuple[float, int]:
    """Run ``true`` to completion; return t0 (s, wall clock) and how many records it made. Retries failures.
    A new client each time: hypercorn closes keep-alive connections idle for 5 s, and a POST on one that it is
    closing fails ("Server disconnected without sending a response")."""
    for _ in range(5):
        async with AsyncClient.from_data_dir(data_dir, timeout=130) as client:
            status = await (await client.submit(["true"], **JOB)).wait(timeout=120)
        if status["state"] == "completed":
            result = status.get("result") or {}
            return status["updated_ms"] / 1000, 2 * (1 + len(result.get("verified_by") or []))
        print(f"  job {status['job_id']} {status['state']}: {status.get('error')}; once more", flush=True)
        await trio.sleep(2)
    raise RuntimeError("the client could not get a job done in 5 tries")


async def at(t0: float) -> tuple[float, int]:
    """For :meth:`Api.watch` when the records are already made: measure from ``t0``."""
    return t0, 0


async def measure(cluster: Cluster, repeats: int, catchup_jobs: int, wait_s: float) -> dict[str, Any]:
    nodes, api = cluster.nodes, Api(cluster.nodes)
    client = nodes[-1].data_dir
    n, out = len(nodes), dict[str, Any](runs=[], pull_nodes=0, gossip=0, pulled=0)
    try:
        answers = (await api.each(nodes, "/v1/peers")).values()
        peers = sorted(sum(p["connected"] for p in answer["peers"]) for _, _, answer in answers)
        out["peers"] = f"{statistics.median(peers):g} ({peers[0]}-{peers[-1]})"
        await trio.sleep(10)  # let the last joins settle, then measure 10 s of an idle cluster
        cpu = cpu_seconds(nodes)
        await trio.sleep(10)
        out["idle_cores"] = (cpu_seconds(nodes) - cpu) / 10
        print(f"  connected peers: {out['peers']}; idle, the nodes use {out['idle_cores']:.2f} cores", flush=True)
        for r in range(repeats + 1):
            before = await api.stats(nodes)
            k, got = await api.watch(
                nodes, max(s["records"] for s in before.values()), partial(run_job, client), wait_s
            )
            after = await api.stats(nodes)
            gossip, pulled = (
                [after[x.name][key] - before[x.name][key] for x in nodes] for key in ("accepted_by_gossip", "pulled")
            )
            times, quorum = sorted(got.values()), [math.ceil(f * n) for f in (0.5, 0.99)]  # nodes for 50% and 99%
            p50, p99 = (times[q - 1] if len(times) >= q else None for q in quorum)
            show = " / ".join(f"{v * 1000:.0f}" if v is not None else "-" for v in (p50, p99))
            print(f"  {f'run {r}' if r else 'warm-up'}: {k} records, {len(got)}/{n} nodes; 50% / 99% {show} ms; "
                  f"copies by gossip {sum(gossip)}, pulled {sum(pulled)}", flush=True)  # fmt: skip
            if r:
                out["runs"].append((p50, p99))
                out["gossip"], out["pulled"] = out["gossip"] + sum(gossip), out["pulled"] + sum(pulled)
                out["pull_nodes"] += sum(1 for d in pulled if d > 0)
        out["round_ms"], out["bracket_ms"] = (statistics.median(v) * 1000 for v in (api.round_s, api.bracket_s))
        print(f"  polling: a round took {out['round_ms']:.0f} ms, an arrival is known within {out['bracket_ms']:.0f} ms"
              f" (medians); the poller used {api.cpu[0] / api.cpu[1]:.0%} of a core", flush=True)  # fmt: skip
        try:
            out["catchup"] = await catchup(cluster, api, client, catchup_jobs, wait_s)
        except RuntimeError as exc:
            print(f"  catch-up: {exc}", flush=True)
            out["catchup"] = None
    finally:
        await api.aclose()
    return out


async def catchup(cluster: Cluster, api: Api, client: Path, jobs: int, wait_s: float) -> dict[str, Any]:
    victim = cluster.nodes[-2]
    live = [node for node in cluster.nodes if node is not victim]
    target = max(s["records"] for s in (await api.stats(cluster.nodes)).values())
    await trio.to_thread.run_sync(Cluster(cluster.base, [victim]).stop)  # the harness's SIGTERM, for one node
    cluster._processes[victim.name].wait()  # reap it
    print(f"  catch-up: {victim.name} stopped; {jobs} jobs while it is down", flush=True)
    took: list[str] = []
    for _ in range(jobs):
        t = time.monotonic()
        t0, k = await run_job(client)
        target, took = target + k, [*took, f"{time.monotonic() - t:.1f}"]
    print(f"  catch-up: the jobs took {', '.join(took)} s", flush=True)
    _, got = await api.watch(live, target, partial(at, t0), wait_s)
    if len(got) < len(live):
        print("  catch-up: not every live node got the records in time", flush=True)
    await trio.sleep(max(0.0, t0 + DOWN_AFTER_S - time.time()))
    with node_config(CATCHUP_SYNC_S):
        start = partial(cluster._start, [victim], bootstrap=[cluster.nodes[0].address], fast=False, timeout=600)
        await trio.to_thread.run_sync(start)
    ready = time.time()
    await api.aclose(victim.name)
    api.open(victim)
    _, got = await api.watch([victim], target, partial(at, ready), wait_s)
    stats = (await api.stats([victim]))[victim.name]
    seconds = got.get(victim.name)
    when = f"{seconds * 1000:.0f} ms after ready" if seconds is not None else "never"
    print(f"  catch-up: {victim.name} held all {target} records {when}; {stats}", flush=True)
    return {"seconds": seconds, "pulled": stats["pulled"], "gossip": stats["accepted_by_gossip"]}


def bench(n: int, args: argparse.Namespace) -> dict[str, Any] | None:
    base = Path(tempfile.mkdtemp(prefix=f"coop-gossip{n}-"))
    os.chmod(base, 0o711)  # as root, the job uid must reach the providers' work dirs
    try:
        print(f"N={n}: starting {n} nodes", flush=True)
        t = time.monotonic()
        with node_config(SYNC_S), progress(base, n):
            cluster = Cluster.start(n, base=base, clients={n - 1}, timeout=START_TIMEOUT_S)
        started = time.monotonic() - t
        print(f"N={n}: all ready after {started:.0f} s", flush=True)
        out: dict[str, Any] | None = None
        try:
            out = trio.run(measure, cluster, args.repeats, args.catchup_jobs, args.timeout)
        except* RuntimeError as group:  # no job could be done: nothing to measure at this size
            print(f"N={n}: given up: {group.exceptions[0]}", flush=True)
        finally:
            t = time.monotonic()
            cluster.stop()
            print(f"N={n}: stopped in {time.monotonic() - t:.0f} s", flush=True)
        return out and out | {"n": n, "start_s": started}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def ms(values: list[float | None]) -> str:
    """Median ms (range) over the runs; runs where too few nodes got there in time are counted apart."""
    got = [v * 1000 for v in values if v is not None]
    text = f"{statistics.median(got):.0f} ({min(got):.0f}-{max(got):.0f}) ms" if got else "-"
    return text + (f", {len(values) - len(got)} run(s) short" if len(got) < len(values) else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,30,50", help="cluster sizes, comma-separated (default 10,30,50)")
    parser.add_argument("--repeats", type=int, default=3, help="measured jobs per size, after a warm-up (default 3)")
    parser.add_argument("--catchup-jobs", type=int, default=5, help="jobs while a node is down (default 5)")
    parser.add_argument("--timeout", type=float, default=2 * SYNC_S + 15, help="seconds to wait for records (75)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 3 or args.repeats < 1:
        parser.error("sizes must be at least 3 (a client, a provider to stop, another), repeats at least 1")
    print(f"{os.cpu_count()} CPUs; ads every {AD_REFRESH_S} s (ttl {AD_TTL_S} s); sync every {SYNC_S} s", flush=True)
    try:
        results = [r for r in (bench(n, args) for n in sizes) if r]
    except KeyboardInterrupt:
        print("interrupted; every node started has been stopped", file=sys.stderr)
        return 130
    head = ["N", "start", "connected peers, median (range)", "idle CPU", "50% of nodes", "99% of nodes", "resolution",
            "copies by gossip / pull", "nodes that pulled", "catch-up after ready"]  # fmt: skip
    print(f"\n| {' | '.join(head)} |\n|{'---|' * len(head)}")
    for r in results:
        c = r["catchup"] or {"seconds": None, "pulled": "-", "gossip": "-"}
        catch = f"{c['seconds'] * 1000:.0f} ms" if c["seconds"] is not None else "never" if r["catchup"] else "failed"
        cells = [r["n"], f"{r['start_s']:.0f} s", r["peers"], f"{r['idle_cores']:.2f} cores",
                 ms([p50 for p50, _ in r["runs"]]), ms([p99 for _, p99 in r["runs"]]), f"{r['bracket_ms']:.0f} ms",
                 f"{r['gossip']} / {r['pulled']}", f"{r['pull_nodes']} of {r['n'] * len(r['runs'])}",
                 f"{catch} ({c['pulled']} pulled, {c['gossip']} by gossip)"]  # fmt: skip
        print(f"| {' | '.join(map(str, cells))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
