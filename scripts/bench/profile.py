"""Where a node's CPU goes: py-spy profiles of the client and a provider during job round trips, and of idle nodes.

    .venv/bin/pip install py-spy==0.4.3                  # a sampling profiler; attaches to a running process
    .venv/bin/python scripts/bench/profile.py [--seconds 20] [--top 25] [--keep DIR]

A 3-node cluster (scripts/cluster.py: node0 and node1 provide, node2 runs ``--no-provide``) with ads every 30 s.

- round trip: node2's client runs ``true`` jobs one after another (``Client.submit(...).result()``) while
  ``py-spy record`` samples node2 and node0 (100 Hz, idle threads left out) for ``--seconds``.
- idle: 10 s after the last job, the same for node1 (no jobs, no finds; ad refresh, DHT and gossip upkeep only).

Printed per profile: the samples (CPU seconds x 100), then the functions holding the most samples, inclusive
(the function or anything it called) and self (on top of the stack), with the package each is in. py-spy counts
trio's ``epoll_wait`` as active; those samples are left out. Raw stacks
(``py-spy --format raw``) are kept under ``--keep`` for a closer look (flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.throughput import node_config
from scripts.cluster import Cluster

PY_SPY = Path(sys.executable).parent / "py-spy"
RATE_HZ = 100


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (package/module.py)``."""
    func, _, where = frame.partition(" (")
    path = where.split(":")[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if "site-packages" in path or "/work/" in path else parts[-1]
    return f"{func} ({short})"


def summarise(raw: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n, frames = int(count), [frame_name(f) for f in stack.split(";")]
        if frames[-1].startswith("EpollIOManager.get_events"):  # trio waiting in epoll_wait: not CPU
            waiting += n
            continue
        total += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    print(f"  {total} samples at {RATE_HZ} Hz = {total / RATE_HZ:.1f} s on the CPU ({waiting} more waiting in epoll)")
    print("  inclusive:")
    for name, n in inclusive.most_common(top):
        print(f"    {n / total:6.1%}  {name}")
    print("  self:")
    for name, n in own.most_common(top // 2):
        print(f"    {n / total:6.1%}  {name}")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    argv = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(RATE_HZ),
            "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="seconds per profile (default 20)")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile (default 25)")
    parser.add_argument("--keep", type=Path, help="keep the raw stacks in this dir (default: a temporary one)")
    args = parser.parse_args()
    if not PY_SPY.exists():
        parser.error(f"py-spy is not installed: {sys.executable} -m pip install py-spy==0.4.3")
    out = args.keep or Path(tempfile.mkdtemp(prefix="coop-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="coop-profile-cluster-"))
    os.chmod(base, 0o711)  # as root, the job uid must reach the providers' work dirs
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; stacks in {out}", flush=True)
    try:
        with node_config(1):
            cluster = Cluster.start(3, base=base, clients={2}, timeout=300)
        with cluster:
            if not cluster.wait_discovery(2, timeout=120):
                sys.exit("node2 did not find both providers")
            client, done, stop = cluster.client(2), [0], threading.Event()

            def jobs() -> None:
                while not stop.is_set():
                    client.submit(["true"], timeout=30, memory="64MiB").result(timeout=60)
                    done[0] += 1

            client.submit(["true"], timeout=30, memory="64MiB").result(timeout=60)  # warm up
            worker = threading.Thread(target=jobs)
            worker.start()
            try:
                spies = {name: record(cluster.nodes[i].pid, args.seconds, out / f"{name}.txt")
                         for name, i in [("roundtrip-client", 2), ("roundtrip-provider", 0)]}  # fmt: skip
                for spy in spies.values():
                    spy.wait()
            finally:
                stop.set()
                worker.join()
            print(f"round trips: {done[0]} jobs in {args.seconds:.0f} s; load average {os.getloadavg()[0]:.1f}")
            client.close()
            time.sleep(10)
            spies["idle"] = record(cluster.nodes[1].pid, args.seconds, out / "idle.txt")
            spies["idle"].wait()
        for name, spy in spies.items():
            print(f"\n{name}:")
            if spy.returncode != 0:
                print(f"  py-spy failed: {spy.stderr.read().decode() if spy.stderr else spy.returncode}")
                continue
            summarise(out / f"{name}.txt", args.top)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
