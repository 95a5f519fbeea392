"""Idle cost of a node (CPU, RSS), its cost per connected peer, and its memory as finished jobs pile up.

    .venv/bin/python scripts/bench/idle.py [--parts idle,peers,jobs] [--idle-seconds 60] [--peers 1,10,50]
                                           [--jobs 10000] [--every 1000] [--max-minutes 30]

Every figure is of one real ``node start`` process (scripts/cluster.py), read from ``/proc/PID``: CPU = user +
system seconds over a wall-clock window, RSS = ``VmRSS``. Ads are refreshed every 30 s (ttl 90 s).

- idle: one provider alone; after 10 s to settle, its CPU over ``--idle-seconds`` (a minute by default), and RSS.
- peers: one provider (the hub) and, in this process, K other libp2p hosts built by ``node.net.open_host`` like a
  node's (Noise, Yamux, server-mode Kademlia, GossipSub on ``/coop/reputation/1``), each bootstrapped from the hub
  (dial, DHT routing-table refresh), with a node's DHT record validators. They stand in for K peer processes,
  which would cost K x ~100 MiB here; the hub cannot tell them apart from nodes that neither advertise nor run
  jobs. For K = 1, 10, 50 in turn (hosts are added), once the hub reports K connected peers and 10 s have passed:
  the hub's CPU over 30 s, and RSS. Reported per peer: the slope between the smallest and largest K.
- jobs: one provider running jobs for itself (its own offer is the only one, so the job goes over the in-memory
  channel, sandboxed as for anyone; ``max_jobs`` 4, ``replicas`` 1). ``Client.map`` of ``true`` jobs in batches of
  ``--every``, RSS after each batch, up to ``--jobs`` or ``--max-minutes``, whichever comes first; the rate too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import scripts.cluster as harness
from node.daemon import record_validators, wall_clock_ms
from node.net import NetHost, open_host
from protocol.identity import Identity
from protocol.reputation import REPUTATION_TOPIC
from scripts.cluster import Cluster, NodeInfo

AD_REFRESH_S, AD_TTL_S = 30, 90
SETTLE_S = 10.0
PEER_WINDOW_S = 30.0


@contextlib.contextmanager
def node_config(extra_provide: str = "", extra: str = "") -> Iterator[None]:
    """Nodes spawned meanwhile get slow ads, plus these lines (the harness formats ``CONFIG`` at spawn)."""
    original = harness.CONFIG
    text = original.replace("{refresh}", str(AD_REFRESH_S)).replace("{ttl}", str(AD_TTL_S))
    harness.CONFIG = text.replace("[provide]\n", f"[provide]\n{extra_provide}", 1) + extra  # type: ignore[misc]
    try:
        yield
    finally:
        harness.CONFIG = original  # type: ignore[misc]


@contextlib.contextmanager
def one_node(name: str, **config: str) -> Iterator[NodeInfo]:
    base = Path(tempfile.mkdtemp(prefix=f"coop-idle-{name}-"))
    os.chmod(base, 0o711)  # as root, the job uid must reach the provider's work dir
    try:
        with node_config(**config):
            cluster = Cluster.start(1, base=base, timeout=300)
        with cluster:
            yield cluster.nodes[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_percent(pid: int, seconds: float) -> float:
    """The process's CPU use over the next ``seconds``, in % of one core (blocks this thread)."""
    c, t = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_s(pid) - c) / (time.monotonic() - t)


async def cpu_percent_async(pid: int, seconds: float) -> float:
    c, t = cpu_s(pid), time.monotonic()
    await trio.sleep(seconds)
    return 100 * (cpu_s(pid) - c) / (time.monotonic() - t)


def idle(seconds: float) -> dict[str, Any]:
    with one_node("idle") as node:
        time.sleep(SETTLE_S)
        cpu = cpu_percent(node.pid, seconds)
        rss = rss_mib(node.pid)
    print(f"  idle: one node alone uses {cpu:.2f}% of a core over {seconds:.0f} s; RSS {rss:.1f} MiB", flush=True)
    return {"cpu": cpu, "rss": rss}


async def _peers(hub: NodeInfo, counts: list[int]) -> list[tuple[int, float, float]]:
    token = json.loads((hub.data_dir / "api.json").read_text())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    out: list[tuple[int, float, float]] = []
    async with (
        httpx.AsyncClient(base_url=hub.api_url, headers=headers, trust_env=False, timeout=60) as http,
        AsyncExitStack() as stack,
    ):
        hosts = 0
        validate, select = record_validators(wall_clock_ms, 2000)  # a node's, so they store the hub's ad as nodes do

        async def connected() -> int:
            peers = (await http.get("/v1/peers")).raise_for_status().json()["peers"]
            return sum(p["connected"] for p in peers)

        for k in counts:
            new = []
            while hosts < k:
                host = await stack.enter_async_context(
                    open_host(
                        seed=Identity.generate().seed(),
                        listen=["/ip4/127.0.0.1/tcp/0"],
                        dht_validate=validate,
                        dht_select=select,
                        gossip_topics={REPUTATION_TOPIC: lambda source, data: False},
                    )
                )
                new.append(host)
                hosts += 1

            async def join(host: NetHost) -> None:
                if await host.bootstrap([hub.address]) != 1:
                    raise RuntimeError("a peer could not reach the hub")

            async with trio.open_nursery() as nursery:  # at once: one by one, 50 joins took over 15 min loaded
                for host in new:
                    nursery.start_soon(join, host)
            with trio.fail_after(120):
                while await connected() < k:  # noqa: ASYNC110 (the hub is another process: poll its API)
                    await trio.sleep(0.5)
            await trio.sleep(SETTLE_S)
            cpu = await cpu_percent_async(hub.pid, PEER_WINDOW_S)
            rss, now = rss_mib(hub.pid), await connected()
            print(f"  peers: {now} connected: the hub uses {cpu:.2f}% of a core; RSS {rss:.1f} MiB", flush=True)
            out.append((now, cpu, rss))
    return out


def peers(counts: list[int]) -> list[tuple[int, float, float]]:
    # When the stand-in hosts close, the hub's last dials to them race their swarm's stop: libp2p logs each with
    # a traceback (ADDCONN_FAIL ... Cannot schedule task after service has stopped). Harmless; keep the output readable.
    logging.getLogger("libp2p.network.swarm").setLevel(logging.ERROR)
    with one_node("hub") as hub:
        return trio.run(_peers, hub, counts)


def jobs(total: int, every: int, max_minutes: float) -> list[tuple[int, float, float]]:
    """(jobs done, RSS MiB, jobs/s of the batch) after each batch."""
    out: list[tuple[int, float, float]] = []
    config = {"extra_provide": "max_jobs = 4\n", "extra": "[trust]\nreplicas = 1\n"}
    with one_node("jobs", **config) as node, Cluster(node.data_dir.parent, [node]).client(0) as client:
        time.sleep(SETTLE_S)
        out.append((0, rss_mib(node.pid), 0.0))
        print(f"  jobs: 0 done, RSS {out[0][1]:.1f} MiB", flush=True)
        deadline, done = time.monotonic() + max_minutes * 60, 0
        while done < total and time.monotonic() < deadline:
            n = min(every, total - done)
            t = time.perf_counter()
            results = client.map([["true"]] * n, timeout=30, memory="64MiB", progress=False)
            rate = n / (time.perf_counter() - t)
            bad = [r for r in results if not r.ok]
            if bad:
                print(f"  jobs: {len(bad)} of {n} failed, e.g. {bad[0].error}", flush=True)
            done += n
            out.append((done, rss_mib(node.pid), rate))
            print(f"  jobs: {done} done, RSS {out[-1][1]:.1f} MiB, {rate:.1f} jobs/s; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="idle,peers,jobs", help="what to measure (default idle,peers,jobs)")
    parser.add_argument("--idle-seconds", type=float, default=60, help="idle CPU window (default 60)")
    parser.add_argument("--peers", default="1,10,50", help="connected peer counts, ascending (default 1,10,50)")
    parser.add_argument("--jobs", type=int, default=10000, help="finished jobs to reach (default 10000)")
    parser.add_argument("--every", type=int, default=1000, help="jobs per batch, RSS after each (default 1000)")
    parser.add_argument("--max-minutes", type=float, default=30, help="stop the jobs part after this (default 30)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    counts = [int(k) for k in args.peers.split(",")]
    if parts - {"idle", "peers", "jobs"} or counts != sorted(counts) or min(counts) < 1 or args.every < 1:
        parser.error("parts are idle, peers, jobs; peer counts ascending and positive; --every positive")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        if "idle" in parts:
            idle(args.idle_seconds)
        if "peers" in parts:
            rows = peers(counts)
            (k0, c0, r0), (k1, c1, r1) = rows[0], rows[-1]
            if k1 > k0:
                print(f"  peers: per connected peer {(r1 - r0) / (k1 - k0) * 1024:.0f} KiB RSS, "
                      f"{(c1 - c0) / (k1 - k0):.3f}% of a core", flush=True)  # fmt: skip
        if "jobs" in parts:
            rows = jobs(args.jobs, args.every, args.max_minutes)
            rates = [rate for _, _, rate in rows[1:]]
            if rates:
                print(f"  jobs: RSS {' -> '.join(f'{r:.0f}' for _, r, _ in rows)} MiB after "
                      f"{', '.join(str(d) for d, _, _ in rows)} jobs; median {statistics.median(rates):.1f} jobs/s",
                      flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted; every node started has been stopped", file=sys.stderr)
        return 130
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
