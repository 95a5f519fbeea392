"""Warm round trip of a trivial job on a 3-node cluster, beside a Dask LocalCluster and the floor, in one run.

Usage:

    .venv/bin/python scripts/bench/roundtrip.py [--runs N] [--warmup W] [--no-dask]

- coop: node2 (``--no-provide``) runs ``Client.submit(["true"]).result()`` N times in a row; node0 and node1
  provide. One round trip is the POST, find (DHT), quotes from both providers, agreement, the job stream (spec,
  sandboxed run, result, receipt), then the long-poll and the log fetches. Each job's timestamps (client and
  provider side) give a breakdown of where the time goes.
- dask: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, ``submit(subprocess.run, ["true"])``.
- floor, in this process: the sandbox executor spawning ``true``, plus two request/response round trips, each on
  a new libp2p stream (a job opens a negotiation stream and a job stream) between two local hosts.

All kinds alternate, round after round (after W warm-up rounds), so load from elsewhere falls on all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.net import NetStream, open_host, receive_frame, send_frame
from node.sandbox import ExecSpec, Limits
from node.sandbox.doctor import collect_facts
from node.sandbox.executor import Executor
from protocol.identity import Identity
from scripts.cluster import Cluster

JOB = {"timeout": 10, "memory": "64MiB"}
ECHO = "/coop-bench/echo/1.0.0"
REQUEST = bytes(512)  # about the size of a signed QuoteRequest or JobSpec
DASK_HINT = ".venv/bin/pip install 'dask[distributed]>=2024.1'"


def p50_p90(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=10, method="inclusive")[8]


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def run_rounds(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each kind, after ``warmup`` untimed rounds, round-robin with the floor's two parts, so
    that load from outside (the machine is shared) falls on every kind alike. The sync calls run in a thread,
    timed there, while this loop (with the floor's two idle hosts) waits."""
    times: dict[str, list[float]] = {name: [] for name in [*calls, SPAWN, STREAM]}
    async with open_floor() as floor:
        for i in range(warmup + runs):
            took = {name: await trio.to_thread.run_sync(_timed, fn) for name, fn in calls.items()}
            for name, part in floor.items():
                t = time.perf_counter()
                await part(i)
                took[name] = time.perf_counter() - t
            if i >= warmup:
                for name, seconds in took.items():
                    times[name].append(seconds)
    return times


PHASES = [
    "POST /v1/jobs",
    "find + quotes + agreement",
    "job stream open, spec to the provider",
    "provider: accept, run `true`, result, receipt",
    "client completes it (after the provider)",
    "long-poll wakes, stdout/stderr fetched",
]
FIND = "find alone (GET /v1/find)"
SPAWN = "executor spawn of `true`"
STREAM = "one request/response on a new stream"


class Coop:
    """node2's side of the round trips, and the breakdown of each job from its timestamps on both sides."""

    def __init__(self, cluster: Cluster) -> None:
        self.client = cluster.client(2)
        self.providers = {node.peer_id: cluster.client(i) for i, node in enumerate(cluster.nodes) if node.provides}
        self.jobs: list[tuple[str, float]] = []  # job id, seconds the POST took

    def round_trip(self) -> None:
        t = time.perf_counter()
        job = self.client.submit(["true"], **JOB)  # type: ignore[arg-type]
        self.jobs.append((job.job_id, time.perf_counter() - t))
        if not job.result(timeout=60).ok:
            sys.exit(f"coop: job {job.job_id} did not succeed: {job.status()}")

    def find(self) -> None:
        self.client.find(cpus=1, memory_bytes=64 << 20)

    def breakdown(self, times: list[float]) -> dict[str, list[float]]:
        """Seconds per phase of the last ``len(times)`` jobs (wall-clock ms on one machine, so comparable)."""
        phases: dict[str, list[float]] = {name: [] for name in PHASES}
        for (job_id, post), total in zip(self.jobs[-len(times) :], times, strict=True):
            mine = self.client.job(job_id).status()
            theirs = self.providers[mine["provider"]].job(job_id).status()
            (attempt,) = mine["attempts"]
            marks = [mine["created_ms"], attempt["started_ms"], theirs["created_ms"], theirs["updated_ms"]]
            marks.append(mine["updated_ms"])
            for name, (a, b) in zip(PHASES[1:5], itertools.pairwise(marks), strict=True):
                phases[name].append((b - a) / 1000)
            phases[PHASES[0]].append(post)
            phases[PHASES[5]].append(total - post - (mine["updated_ms"] - mine["created_ms"]) / 1000)
        return phases

    def close(self) -> None:
        for client in [self.client, *self.providers.values()]:
            client.close()


@contextlib.contextmanager
def open_coop() -> Iterator[Coop]:
    """A 3-node cluster in a temporary dir: node0 and node1 provide, node2 (``--no-provide``) submits."""
    base = Path(tempfile.mkdtemp(prefix="coop-roundtrip-"))
    os.chmod(base, 0o711)  # as root, the job uid must reach the providers' work dirs
    try:
        with Cluster.start(3, base=base, clients={2}) as cluster:
            if not cluster.wait_discovery(2):
                sys.exit("coop: node2 did not find both providers in time")
            coop = Coop(cluster)
            try:
                yield coop
            finally:
                coop.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def open_dask() -> Iterator[Callable[[], Any] | None]:
    """One Dask round trip as a function, or None (with a note) when Dask is not installed."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        print(f"dask: not installed, baseline skipped (install it with {DASK_HINT})")
        yield None
        return
    quiet: dict[str, Any] = {"dashboard_address": None, "silence_logs": 40}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **quiet) as cluster, Client(cluster) as dc:
        # pure=False: identical calls must not be answered from the first one's cached result
        yield lambda: dc.submit(subprocess.run, ["true"], pure=False).result()


@contextlib.asynccontextmanager
async def open_floor() -> AsyncIterator[dict[str, Callable[[int], Awaitable[None]]]]:
    """The floor's two parts: the executor spawning `true`, and one request/response on a new libp2p stream."""
    facts = await trio.to_thread.run_sync(lambda: collect_facts(gpus=False))
    executor = Executor(facts=facts)
    if executor.decision.tier is None:
        sys.exit(f"floor: no sandbox here: {executor.decision.reason}")
    work = Path(tempfile.mkdtemp(prefix="coop-bench-"))
    os.chmod(work, 0o711)  # the job uid must reach the work dirs

    async def spawn(i: int) -> None:
        spec = ExecSpec(
            command=("true",), work_dir=work / f"job{i}", limits=Limits(wall_seconds=10, memory_bytes=64 << 20)
        )
        if (await executor.run(spec)).exit_status != 0:
            sys.exit("floor: the executor could not run `true`")

    async def echo(stream: NetStream) -> None:
        await send_frame(stream, await receive_frame(stream, 4096))

    listen = ["/ip4/127.0.0.1/tcp/0"]
    try:
        async with (
            open_host(seed=Identity.generate().seed(), listen=listen) as a,
            open_host(seed=Identity.generate().seed(), listen=listen) as b,
        ):
            b.set_stream_handler(ECHO, echo)
            await a.connect(b.addrs()[0])

            async def request(i: int) -> None:
                async with await a.open_stream(b.peer_id, ECHO) as stream:
                    await send_frame(stream, REQUEST)
                    await receive_frame(stream, 4096)

            yield {SPAWN: spawn, STREAM: request}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- report


def row(name: str, p50: float, p90: float) -> None:
    print(f"  {name:<46} {p50 * 1000:9.1f} {p90 * 1000:9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed round trips of each kind (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed round trips first (default 5)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask baseline")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    print(f"{args.runs} round trips of `true` each, after {args.warmup} warm-up runs; {os.cpu_count()} CPUs")
    try:
        with open_coop() as coop, contextlib.nullcontext() if args.no_dask else open_dask() as dask:
            calls = {"coop": coop.round_trip} | ({"dask": dask} if dask else {}) | {FIND: coop.find}
            times = trio.run(run_rounds, calls, args.runs, args.warmup)
            phases = coop.breakdown(times["coop"])
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    c50, c90 = p50_p90(times["coop"])
    s50, s90 = p50_p90(times[SPAWN])
    r50, r90 = p50_p90(times[STREAM])
    floor50, floor90 = s50 + 2 * r50, s90 + 2 * r90
    print(f"\n  {'ms':<46} {'p50':>9} {'p90':>9}")
    row("coop: 3 nodes, submit(['true']).result()", c50, c90)
    if "dask" in times:
        row("dask: LocalCluster, submit(subprocess.run)", *p50_p90(times["dask"]))
    row("floor: executor spawn + 2 stream round trips", floor50, floor90)
    row(f"  {SPAWN}", s50, s90)
    row(f"  {STREAM}", r50, r90)
    print("\n  where a coop round trip goes (each phase's own p50 and p90, so they need not add up)")
    for name in [*PHASES, FIND]:
        row(f"  {name}", *p50_p90(phases[name] if name in phases else times[name]))
    print()
    if "dask" in times:
        d50, d90 = p50_p90(times["dask"])
        print(f"coop / dask:  {c50 / d50:6.1f}x at p50, {c90 / d90:6.1f}x at p90")
    print(f"coop / floor: {c50 / floor50:6.1f}x at p50, {c90 / floor90:6.1f}x at p90 (floor p90: sum of p90s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
