"""Discovery: time and DHT hops to find the providers of a resource class at N nodes, against log2 N.

    .venv/bin/python scripts/bench/discovery.py [--sizes 10,30,100] [--finds 5] [--queriers 4]

For each N, N ``node start`` processes (scripts/cluster.py; node N-1 is a ``--no-provide`` client, the other N-1
provide the ``cpu`` class). Ads are refreshed every 30 s (ttl 90 s) instead of the harness's 5 s, as in
gossip.py, so that up to 100 processes on 2 cores are mostly idle. Once every node is ready, the client polls
``GET /v1/find?cpus=1`` every 5 s until it sees every provider (the "converged" column: how long after the last node was
ready), then the cluster is left alone 10 s and its idle CPU and each node's RSS (``/proc/PID/status`` VmRSS) are
read. Then Q nodes (the client and Q-1 providers spread over the index range) each run F finds, one at a time.

What a find reports (``/v1/find``'s ``lookup``, filled by ``node/net/lookup.py``; py-libp2p does not expose it):

- ``walk_ms``: the iterative FIND_NODE walk towards the class key; ``hops``: the longest chain of peers it queried,
  each named by the one before (1 = only peers from our routing table); ``rounds``: its batches of up to ALPHA
  (10) parallel queries; ``queried``: FIND_NODE queries sent.
- ``total_ms``: the walk plus one GET_PROVIDERS to each of the (up to 20) closest peers found: the provider hints.
- ``hints_ms``: the main key's lookup and, when its answer is full (20 or more), the 8 shard keys' (node/hints.py).
- ``ads_ms``, ``find_ms``: confirming every hinted provider's signed ad, and the whole find. Each ad is reused
  for 30 s (``ads_cached``), else asked of its provider over a stream (``ads_direct``), else of the DHT
  (``ads_dht``, a walk each; ``direct_failed`` says why); ``ads_missing``: neither had one. This part grows
  with the number of providers, not with log N.

Printed per N: medians (p90) of each, ``walk_ms / log2 N`` and ``hops / log2 N``, which stay flat if the lookup
grows as log N, and the load average (the machine is shared). The cluster is stopped before the next N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.gossip import SYNC_S, cpu_seconds, node_config, progress
from scripts.cluster import Cluster, NodeInfo

START_TIMEOUT_S = 900.0
CONVERGE_TIMEOUT_S = 300.0
CONVERGE_POLL_S = 5.0  # each poll is a find: a DHT walk, then a DHT get per provider, so not too often
FIGURES = ["walk_ms", "total_ms", "hints_ms", "ads_ms", "find_ms", "hops", "rounds", "queried", "provider_queries",
           "providers", "ads_cached", "ads_direct", "ads_dht", "ads_missing", "found"]  # fmt: skip


def rss_mib(node: NodeInfo) -> float:
    """Resident memory of the node's process, MiB."""
    for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {node.name}")


def http_for(node: NodeInfo) -> httpx.Client:
    token = json.loads((node.data_dir / "api.json").read_text())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=node.api_url, headers=headers, trust_env=False, timeout=120)


def find(http: httpx.Client) -> dict[str, Any]:
    """One ``GET /v1/find?cpus=1``: the lookup's figures, how many providers it confirmed, and the HTTP wall time."""
    t = time.perf_counter()
    response = http.get("/v1/find", params={"cpus": 1})
    response.raise_for_status()
    answer = response.json()
    return answer["lookup"] | {"found": len(answer["providers"]), "http_ms": (time.perf_counter() - t) * 1000}


def converge(http: httpx.Client, providers: int) -> tuple[float, int]:
    """Poll finds until all ``providers`` are found; seconds it took and the most found (if it timed out)."""
    t, best = time.monotonic(), 0
    while time.monotonic() - t < CONVERGE_TIMEOUT_S:
        best = max(best, find(http)["found"])
        if best >= providers:
            break
        time.sleep(CONVERGE_POLL_S)  # the providers' ads spread through other processes' DHT: poll
    return time.monotonic() - t, best


def measure(cluster: Cluster, finds: int, queriers: int) -> dict[str, Any]:
    nodes = cluster.nodes
    n, providers = len(nodes), sum(node.provides for node in nodes)
    picks = sorted({n - 1, *(round(i * (n - 2) / max(queriers - 1, 1)) for i in range(queriers - 1))})
    https = {i: http_for(nodes[i]) for i in picks}
    try:
        converged, best = converge(https[n - 1], providers)
        print(f"  the client found {best}/{providers} providers after {converged:.1f} s", flush=True)
        time.sleep(10)  # let the last finds' traffic settle, then measure 10 s of an idle cluster
        cpu = cpu_seconds(nodes)
        time.sleep(10)
        idle = (cpu_seconds(nodes) - cpu) / 10
        rss = sorted(rss_mib(node) for node in nodes)
        load = os.getloadavg()[0]
        print(f"  idle: the nodes use {idle:.2f} cores; RSS per node median {statistics.median(rss):.0f} MiB "
              f"({rss[0]:.0f}-{rss[-1]:.0f}), all {sum(rss) / 1024:.1f} GiB; load average {load:.1f}",
              flush=True)  # fmt: skip
        samples: list[dict[str, Any]] = []
        for _ in range(finds):
            for i in picks:
                samples.append(find(https[i]) | {"querier": i})
        for s in samples:
            figures = ", ".join(f"{k} {s[k]:g}" for k in [*FIGURES, "http_ms"])
            print(f"    node{s['querier']}: {figures}, direct_failed {s['direct_failed']}", flush=True)
    finally:
        for http in https.values():
            http.close()
    return {"n": n, "providers": providers, "converged_s": converged, "converged_found": best, "idle_cores": idle,
            "rss": rss, "load": load, "samples": samples}  # fmt: skip


def bench(n: int, args: argparse.Namespace) -> dict[str, Any] | None:
    base = Path(tempfile.mkdtemp(prefix=f"coop-discovery{n}-"))
    try:
        print(f"N={n}: starting {n} nodes (load average {os.getloadavg()[0]:.1f})", flush=True)
        t = time.monotonic()
        with node_config(SYNC_S, args.ad_refresh, 3 * args.ad_refresh), progress(base, n):
            cluster = Cluster.start(n, base=base, clients={n - 1}, timeout=START_TIMEOUT_S, seeds=args.seeds)
        started = time.monotonic() - t
        print(f"N={n}: all ready after {started:.0f} s", flush=True)
        try:
            return measure(cluster, args.finds, args.queriers) | {"start_s": started}
        except httpx.HTTPError as exc:
            print(f"N={n}: given up: {exc!r}", flush=True)
            return None
        finally:
            t = time.monotonic()
            cluster.stop()
            print(f"N={n}: stopped in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def med_p90(values: list[float]) -> str:
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return f"{statistics.median(values):.0f} ({p90:.0f})"


def report(results: list[dict[str, Any]]) -> None:
    head = ["N", "log2 N", "start", "converged", "idle CPU", "RSS/node, median (max)", "load", "FIND_NODE walk ms",
            "walk / log2 N", "hops", "hops / log2 N", "rounds", "queried", "hints ms (walk + GET_PROVIDERS)",
            "find ms (+ ads)", "of which shards", "of which ads", "found"]  # fmt: skip
    print(f"\n| {' | '.join(head)} |\n|{'---|' * len(head)}")
    for r in results:
        col = {k: [float(s[k]) for s in r["samples"]] for k in FIGURES}
        log_n = math.log2(r["n"])
        walk, hops = statistics.median(col["walk_ms"]), statistics.median(col["hops"])
        cells = [r["n"], f"{log_n:.2f}", f"{r['start_s']:.0f} s",
                 f"{r['converged_s']:.0f} s ({r['converged_found']}/{r['providers']})", f"{r['idle_cores']:.2f} cores",
                 f"{statistics.median(r['rss']):.0f} ({r['rss'][-1]:.0f}) MiB", f"{r['load']:.1f}",
                 med_p90(col["walk_ms"]), f"{walk / log_n:.0f}",
                 f"{hops:g} ({min(col['hops']):g}-{max(col['hops']):g})",
                 f"{hops / log_n:.2f}", f"{statistics.median(col['rounds']):g}",
                 f"{statistics.median(col['queried']):g}", med_p90(col["total_ms"]), med_p90(col["find_ms"]),
                 med_p90([h - t for h, t in zip(col["hints_ms"], col["total_ms"], strict=True)]),
                 med_p90(col["ads_ms"]), f"{statistics.median(col['found']):g}/{r['providers']}"]  # fmt: skip
        print(f"| {' | '.join(map(str, cells))} |")
    print("\nmedian (p90) over every querier's finds; hops as median (range)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,30,100", help="cluster sizes, comma-separated (default 10,30,100)")
    parser.add_argument("--finds", type=int, default=5, help="finds per querying node (default 5)")
    parser.add_argument("--queriers", type=int, default=4, help="nodes that run finds, the client included (4)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="join through the first S nodes, two each (default 1)")  # fmt: skip
    parser.add_argument("--ad-refresh", type=float, default=30.0,
                        help="seconds between a provider's ads, ttl 3 times that (default 30; nodes: 60)")  # fmt: skip
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 3 or args.finds < 1 or args.queriers < 1:
        parser.error("sizes must be at least 3, finds and queriers at least 1")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        results = [r for r in (bench(n, args) for n in sizes) if r]
    except KeyboardInterrupt:
        print("interrupted; every node started has been stopped", file=sys.stderr)
        return 130
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
