"""Idle cost of a whole cluster at the node defaults, over time after start-up, and where an idle node's CPU goes.

    .venv/bin/pip install py-spy==0.4.3
    .venv/bin/python scripts/bench/cluster_idle.py [--n 30] [--settle 120] [--window 30] [--top 30]

Starts N ``node start`` processes (scripts/cluster.py, the last one ``--no-provide``, joining through the first 3)
with the node's own ad cadence (every 60 s, ttl 180 s) and reputation sync (30 s). Once every node is ready, prints
the cluster's CPU (all nodes' user + system time, in cores) for each 30 s of ``--settle``; then, over one more
``--window``, the cluster's CPU, the spread per node, and py-spy profiles (scripts/bench/profile.py's summary) of a
seed (node0), a provider from the middle and the client. Nothing runs jobs or finds meanwhile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.gossip import cpu_seconds, node_config
from scripts.bench.profile import PY_SPY, record, summarise
from scripts.cluster import Cluster

STEP_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="nodes (default 30)")
    parser.add_argument("--settle", type=float, default=120, help="seconds measured in 30 s steps after ready (120)")
    parser.add_argument("--window", type=float, default=30, help="seconds of the profiled window (default 30)")
    parser.add_argument("--top", type=int, default=30, help="functions shown per profile (default 30)")
    args = parser.parse_args()
    if args.n < 3:
        parser.error("--n must be at least 3")
    if not PY_SPY.exists():
        parser.error(f"py-spy is not installed: {sys.executable} -m pip install py-spy==0.4.3")
    base = Path(tempfile.mkdtemp(prefix=f"coop-idle{args.n}-"))
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        t = time.monotonic()
        with node_config(30, 60, 180):
            cluster = Cluster.start(args.n, base=base, clients={args.n - 1}, timeout=900, seeds=3)
        print(f"N={args.n}: ready after {time.monotonic() - t:.0f} s", flush=True)
        with cluster:
            for step in range(int(args.settle // STEP_S)):
                before = cpu_seconds(cluster.nodes)
                time.sleep(STEP_S)
                cores = (cpu_seconds(cluster.nodes) - before) / STEP_S
                print(f"  +{(step + 1) * STEP_S:.0f} s: {cores:.2f} cores (load {os.getloadavg()[0]:.1f})", flush=True)
            picks = [0, args.n // 2, args.n - 1]
            profiles = [(i, base / f"profile-node{i}.txt") for i in picks]
            spies = [record(cluster.nodes[i].pid, args.window, out) for i, out in profiles]
            before = {node.name: cpu_seconds([node]) for node in cluster.nodes}
            time.sleep(args.window)
            per = sorted((cpu_seconds([n]) - before[n.name]) / args.window for n in cluster.nodes)
            print(f"window of {args.window:.0f} s: {sum(per):.2f} cores; per node min {per[0]:.1%}, "
                  f"median {per[len(per) // 2]:.1%}, max {per[-1]:.1%} of a core", flush=True)  # fmt: skip
            for spy in spies:
                spy.wait()
            for i, out in profiles:
                print(f"node{i}{' (client)' if i == args.n - 1 else ''}:")
                summarise(out, args.top)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
