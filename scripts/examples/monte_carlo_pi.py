"""Estimate pi across the Coop network with Python function jobs (standard library only).

Usage: python scripts/examples/monte_carlo_pi.py [DATA_DIR] [--jobs N] [--samples S]

DATA_DIR is the data dir of a running node (`node start`, or `scripts/cluster.py up 4` and .coop-cluster/node3);
default: $COOP_HOME, else ~/.local/share/coop. Each job throws S random darts at the unit square with its own
seed and counts those inside the quarter circle; `client.map` runs the jobs at once on whichever providers
win them and returns the counts in order.
"""

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.client import Client, JobFailed  # after the path fix: runs from a checkout


def darts(seed: int, samples: int = 200_000) -> int:
    """How many of ``samples`` random points in the unit square fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=os.environ.get("COOP_HOME"))
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    with Client.from_data_dir(Path(args.data_dir) if args.data_dir else None) as client:
        started = time.perf_counter()
        try:
            hits = client.map(lambda seed: darts(seed, args.samples), range(args.jobs), memory="128MiB", timeout=120)
        except JobFailed as exc:  # nobody took a job, or every attempt failed: exc.error says why
            print(f"a job failed: {exc.error}")
            return 1
        took = time.perf_counter() - started
        jobs = client.jobs(limit=args.jobs)
    total = args.jobs * args.samples
    estimate = 4 * sum(hits) / total
    providers = {j["provider"] for j in jobs if j.get("provider")}
    print(f"{args.jobs} jobs x {args.samples} darts on {len(providers)} provider(s) in {took:.1f} s")
    print(f"pi ~ {estimate:.5f} (error {abs(estimate - math.pi):.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
