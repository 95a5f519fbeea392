"""Throughput: trivial jobs per second from one client over P providers, beside a Dask LocalCluster, in one run.

    .venv/bin/python scripts/bench/throughput.py [--providers 3,10] [--jobs 200] [--warmup 10] [--verify]

For each P: a cluster of P + 1 ``node start`` processes (scripts/cluster.py): node0..nodeP-1 provide (each runs up
to ``max_jobs`` = 2 jobs at once, the default), nodeP runs ``--no-provide``. Ads are refreshed every 30 s (ttl 90 s,
as in gossip.py) so that the idle nodes leave the CPUs to the jobs. The client waits until it finds every
provider, runs W warm-up jobs, then times ``Client.map([["true"]] * J)``: every job submitted before any is waited
for, then all results (stdout and stderr fetched). By default the client's ``[trust] replicas`` is 1: without it,
every job on a provider it does not trust yet (all of them, at first) is run twice to compare results (adaptive
verification), which halves the rate; ``--verify`` keeps the default (2) to measure that too.

Beside it, after the cluster is stopped: ``dask.distributed.LocalCluster(n_workers=P, threads_per_worker=2,
processes=True)`` (P worker processes, two jobs at once each, like the providers), W warm-up calls, then J
``client.submit(subprocess.run, ["true"], pure=False)`` at once, gathered. Printed: jobs per second of each, and
coop / Dask. Dask runs ``true`` without a sandbox, discovery, negotiation, signatures or receipts: it is the
floor of "run a subprocess on a worker process", not a like-for-like system.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import scripts.cluster as harness
from scripts.cluster import Cluster

AD_REFRESH_S, AD_TTL_S = 30, 90
JOB: dict[str, Any] = {"timeout": 30, "memory": "64MiB", "progress": False}
DASK_HINT = ".venv/bin/pip install 'dask[distributed]>=2024.1'"


@contextlib.contextmanager
def node_config(replicas: int | None) -> Iterator[None]:
    """Nodes spawned meanwhile get slow ads and, unless None, this many replicas per job (the harness formats its
    ``CONFIG`` template at spawn and has no option for either)."""
    original = harness.CONFIG
    text = original.replace("{refresh}", str(AD_REFRESH_S)).replace("{ttl}", str(AD_TTL_S))
    harness.CONFIG = text + (f"[trust]\nreplicas = {replicas}\n" if replicas else "")  # type: ignore[misc]
    try:
        yield
    finally:
        harness.CONFIG = original  # type: ignore[misc]


def coop(providers: int, jobs: int, warmup: int, replicas: int | None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix=f"coop-throughput{providers}-"))
    os.chmod(base, 0o711)  # as root, the job uid must reach the providers' work dirs
    try:
        t = time.monotonic()
        with node_config(replicas):
            cluster = Cluster.start(providers + 1, base=base, clients={providers}, timeout=600)
        with cluster:
            print(f"  coop: {providers + 1} nodes ready after {time.monotonic() - t:.0f} s", flush=True)
            if not cluster.wait_discovery(providers, timeout=120):
                raise RuntimeError(f"node{providers} did not find all {providers} providers in 120 s")
            with cluster.client(providers) as client:
                client.map([["true"]] * warmup, **JOB)
                t = time.perf_counter()
                results = client.map([["true"]] * jobs, **JOB)
                took = time.perf_counter() - t
            load = os.getloadavg()[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ok = sum(r.ok for r in results)
    per_provider = sorted(collections.Counter(r.provider for r in results if r.ok).values(), reverse=True)
    failed = collections.Counter((r.error or r.state)[:80] for r in results if not r.ok)
    print(f"  coop: {ok}/{jobs} ok in {took:.2f} s = {ok / took:.1f} jobs/s; per provider {per_provider}; "
          f"attempts {sum(r.attempts for r in results)}; load average {load:.1f}", flush=True)  # fmt: skip
    for reason, count in failed.items():
        print(f"    {count} failed: {reason}", flush=True)
    return {"rate": ok / took, "ok": ok, "seconds": took, "load": load, "spread": per_provider}


def dask(workers: int, jobs: int, warmup: int) -> dict[str, Any] | None:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        print(f"  dask: not installed, baseline skipped (install it with {DASK_HINT})", flush=True)
        return None
    quiet: dict[str, Any] = {"dashboard_address": None, "silence_logs": 40}
    with (
        LocalCluster(n_workers=workers, threads_per_worker=2, processes=True, **quiet) as cluster,
        Client(cluster) as dc,
    ):
        dc.gather(dc.map(subprocess.run, [["true"]] * warmup, pure=False))
        t = time.perf_counter()
        results = dc.gather(dc.map(subprocess.run, [["true"]] * jobs, pure=False))
        took = time.perf_counter() - t
    ok = sum(r.returncode == 0 for r in results)
    load = os.getloadavg()[0]
    print(f"  dask: {ok}/{jobs} ok in {took:.2f} s = {ok / took:.1f} jobs/s; load average {load:.1f}", flush=True)
    return {"rate": ok / took, "ok": ok, "seconds": took, "load": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="3,10", help="provider counts, comma-separated (default 3,10)")
    parser.add_argument("--jobs", type=int, default=200, help="timed jobs per run (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed jobs first (default 10)")
    parser.add_argument("--verify", action="store_true", help="keep adaptive verification (replicas = 2)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask baseline")
    args = parser.parse_args()
    counts = [int(p) for p in args.providers.split(",")]
    if min(counts) < 1 or args.jobs < 1 or args.warmup < 0:
        parser.error("at least one provider and one job")
    print(f"{os.cpu_count()} CPUs; {args.jobs} jobs of `true` per run after {args.warmup} warm-up; "
          f"verification {'on (replicas 2)' if args.verify else 'off (replicas 1)'}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    rows = []
    try:
        for p in counts:
            print(f"P={p}:", flush=True)
            c = coop(p, args.jobs, args.warmup, None if args.verify else 1)
            d = None if args.no_dask else dask(p, args.jobs, args.warmup)
            rows.append((p, c, d))
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    head = ["providers", "coop jobs/s", "coop jobs per provider", "Dask jobs/s", "coop / Dask", "load (coop, Dask)"]
    print(f"\n| {' | '.join(head)} |\n|{'---|' * len(head)}")
    for p, c, d in rows:
        spread = f"{c['spread'][0]}-{c['spread'][-1]}" if c["spread"] else "-"
        cells = [p, f"{c['rate']:.1f} ({c['ok']}/{args.jobs} ok)", spread, f"{d['rate']:.1f}" if d else "-",
                 f"{c['rate'] / d['rate']:.3f}" if d else "-",
                 f"{c['load']:.1f}, {d['load']:.1f}" if d else "-"]  # fmt: skip
        print(f"| {' | '.join(map(str, cells))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
