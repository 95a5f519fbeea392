"""client.map of a trivial Python function over a 3-node cluster, beside Dask's client.map, in one run.

Usage:

    .venv/bin/python scripts/bench/functions.py [--items N] [--rounds R] [--no-dask]

- coop: node2 (``--no-provide``) runs ``Client.map(inc, range(N))``: N function jobs (cloudpickle, find, quotes,
  agreement, the sandboxed ``python3 -m coop_runner``, result, receipt), values in order. node0 and node1 provide.
- dask: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, ``client.gather(client.map(inc,
  range(N), pure=False))``.

Rounds alternate coop and Dask, so load from elsewhere falls on both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.client import Client
from scripts.cluster import Cluster

DASK_HINT = ".venv/bin/pip install 'dask[distributed]>=2024.1'"


def inc(x: int) -> int:
    return x + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    expected = [inc(i) for i in range(args.items)]
    times: dict[str, list[float]] = {"coop": [], "dask": []}
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coop-bench-fn-")))
        cluster = stack.enter_context(Cluster.start(3, base=base, clients={2}))
        client = stack.enter_context(Client.from_data_dir(cluster.nodes[2].data_dir))
        dask = None
        if not args.no_dask:
            try:
                from dask.distributed import Client as DaskClient
                from dask.distributed import LocalCluster
            except ImportError:
                print(f"dask not installed ({DASK_HINT}): coop only")
            else:
                local = stack.enter_context(
                    LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
                )
                dask = stack.enter_context(DaskClient(local))
        options = {"memory": "64MiB", "timeout": 60}
        assert client.map(inc, range(2), **options) == [1, 2]  # warm-up: the find cache, the providers
        if dask is not None:
            dask.gather(dask.map(inc, range(2), pure=False))
        for r in range(args.rounds):
            t = time.perf_counter()
            assert client.map(inc, range(args.items), **options) == expected
            times["coop"].append(time.perf_counter() - t)
            if dask is not None:
                t = time.perf_counter()
                assert dask.gather(dask.map(inc, range(args.items), pure=False)) == expected
                times["dask"].append(time.perf_counter() - t)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), flush=True)
    coop = statistics.median(times["coop"])
    print(f"\nclient.map(inc, range({args.items})), median of {args.rounds} rounds:")
    print(f"  coop  {coop:8.3f} s  ({coop / args.items * 1000:.0f} ms per item)")
    if times["dask"]:
        dask_s = statistics.median(times["dask"])
        print(f"  dask  {dask_s:8.3f} s  ({dask_s / args.items * 1000:.1f} ms per item)")
        print(f"  coop / dask = {coop / dask_s:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
