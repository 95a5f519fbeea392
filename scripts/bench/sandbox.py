"""Spawn overhead of the sandbox executor for `true`, against a bare `bwrap ... true` and a plain `true`.

All three are measured in the same run, interleaved, from the trio loop. Usage:

    .venv/bin/python scripts/bench/sandbox.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.sandbox import ExecSpec, Limits
from node.sandbox.command import bwrap_probe_argv, drop_argv
from node.sandbox.doctor import collect_facts
from node.sandbox.executor import Executor


async def _spawn(argv: list[str]) -> float:
    t = time.perf_counter()
    await trio.run_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


async def main(runs: int) -> None:
    facts = collect_facts(gpus=False)
    executor = Executor(facts=facts)
    if facts.bwrap.path is None or not facts.bwrap.works:
        sys.exit(f"bwrap does not work here: {executor.decision.reason}")
    true = shutil.which("true") or "/usr/bin/true"
    drop = drop_argv(facts.setpriv, facts.job_uid, facts.job_gid) if facts.is_root else []
    bare = bwrap_probe_argv(bwrap=facts.bwrap.path, layout=facts.layout, setpriv=None, uid=0, gid=0)
    bare = [*drop, *bare]
    base = Path(tempfile.mkdtemp(prefix="coop-bench-"))
    os.chmod(base, 0o711)  # the job uid must reach the work dirs
    times: dict[str, list[float]] = {"true": [], "bwrap true": [], "executor true": []}
    try:
        for i in range(runs + 3):  # the first three warm caches and are dropped
            t_true = await _spawn([true])
            t_bwrap = await _spawn(bare)
            spec = ExecSpec(command=("true",), work_dir=base / f"job{i}", limits=Limits(wall_seconds=30))
            t = time.perf_counter()
            result = await executor.run(spec)
            t_exec = time.perf_counter() - t
            if result.exit_status != 0:
                sys.exit(f"executor run failed: {result}")
            if i >= 3:
                times["true"].append(t_true)
                times["bwrap true"].append(t_bwrap)
                times["executor true"].append(t_exec)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tier: {executor.decision.reason}")
    print(f"runs: {runs} each, interleaved; medians:")
    for k, v in med.items():
        print(f"  {k:<14} {v * 1000:8.2f} ms")
    print(f"executor / bare bwrap: {med['executor true'] / med['bwrap true']:.2f}x")
    print(f"executor / plain true: {med['executor true'] / med['true']:.2f}x")
    print(f"bare bwrap / plain true: {med['bwrap true'] / med['true']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    trio.run(main, parser.parse_args().runs)
