"""Simulate a Coop network of N nodes for some days, once per trust mode, and print the measures.

    python scripts/sim/run.py --nodes 1000 --seed 1                 # the three modes side by side
    python scripts/sim/run.py --nodes 10000 --seed 1 --plot docs/sim --json /tmp/sim.json

Modes, run on the same population and the same job stream: ``coop`` (the project's trust, ranking and
verification), ``eigentrust`` (textbook EigenTrust with a fixed pre-trusted set in their place) and ``off``
(reputation off: a random pick among the fitting providers that quoted, no verification).
See docs/simulation.md for the model and its limits.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.cosign import sign_as
from protocol.messages import Outcome, Receipt, Usage
from protocol.trust import DAY_MS as TRUST_DAY_MS
from protocol.trust import TrustParams
from scripts.sim.engine import Engine, Link
from scripts.sim.market import Market
from scripts.sim.measures import Measures, report
from scripts.sim.population import (
    DAY_MS,
    EPOCH_MS,
    HOUR_MS,
    Job,
    Node,
    SimConfig,
    build_population,
    make_job,
    make_node,
)
from scripts.sim.trustviews import CoopTrust, EigenTrust, NoTrust, RecordIndex

MODES = ("coop", "eigentrust", "off")
DEFAULTS = SimConfig()


def workload(config: SimConfig, nodes: list[Node], seed: int) -> list[Job]:
    """Every job of the run, drawn up front so that every mode gets the same stream.

    Each consuming node submits in a Poisson stream during its owner's day (08:00-20:00 local), on average
    ``jobs_per_client_day`` a day.
    """
    rng = random.Random(f"{seed}/jobs")
    jobs: list[Job] = []
    end = EPOCH_MS + config.days * DAY_MS
    rate = 2 * config.jobs_per_client_day / DAY_MS  # thinned to half the day below
    for node in nodes:
        if not node.consumes:
            continue
        t = EPOCH_MS + rng.expovariate(rate)
        while t < end:
            hour = (int(t - EPOCH_MS) // HOUR_MS + node.utc_offset) % 24
            if 8 <= hour < 20:
                jobs.append(make_job(len(jobs), node.index, int(t), rng, config))
            t += rng.expovariate(rate)
    jobs.sort(key=lambda j: (j.submitted, j.index))
    return jobs


class World:
    """One run: the population, the job stream, a trust mode, and the hourly housekeeping."""

    def __init__(self, config: SimConfig, seed: int, mode: str) -> None:
        self.config = config
        self.mode = mode
        self.rng = random.Random(f"{seed}/{mode}")
        self.nodes = build_population(config, random.Random(f"{seed}/population"))
        self.jobs = workload(config, self.nodes, seed)
        self.engine = Engine(self.rng, EPOCH_MS)
        self.link = Link(self.engine, loss=config.loss, duplication=config.duplication)
        self.records = RecordIndex()
        self.measures = Measures(config.days)
        params = TrustParams(half_life_ms=int(config.half_life_days * TRUST_DAY_MS), tolerance=config.trust_tolerance)
        view: Any
        if mode == "coop":
            view = CoopTrust(self.records, params=params, max_raters=config.trust_max_raters,
                             refresh_ms=config.trust_refresh_ms)  # fmt: skip
        elif mode == "eigentrust":
            picker = random.Random(f"{seed}/pretrusted")
            servers = [n.peer for n in self.nodes if n.role == "honest" and n.always_on]
            count = max(3, round(config.eigentrust_pretrusted * len(servers)))
            view = EigenTrust(self.records, pretrusted=picker.sample(servers, min(count, len(servers))),
                              refresh_ms=config.eigentrust_refresh_ms)  # fmt: skip
        elif mode == "off":
            view = NoTrust()
        else:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.view = view
        self.market = Market(config=config, rng=self.rng, nodes=self.nodes, engine=self.engine, link=self.link,
                             view=view, records=self.records, measures=self.measures)  # fmt: skip
        self.rings = {
            "sybil": [n.index for n in self.nodes if n.role == "sybil"],
            "collusion": [n.index for n in self.nodes if n.role in ("colluder", "front")],
        }
        self.fake = 0

    def submit(self, job: Job) -> None:
        day = self.measures.day(job.submitted)
        day.submitted += 1
        self.measures.by_role_submitted[self.nodes[job.client].role] += 1
        self.market.start_round(job)

    def hourly(self) -> None:
        now, rng, config = self.engine.now, self.rng, self.config
        for node in list(self.nodes):  # churn: honest providers leave for good, as many new ones join
            if node.role == "honest" and node.alive and rng.random() < config.churn_per_day / 24:
                node.alive = False
                new = make_node(len(self.nodes), "honest", rng, config)
                new.consumes = False
                self.nodes.append(new)
                self.market.by_peer[new.peer] = new.index
        online = [n for n in self.nodes if n.provides and n.alive and n.idle_now(now)]
        for node in self.nodes:
            node.online = False
        for node in online:
            node.online = True
        self.market.online = [n.index for n in online]
        day = self.measures.day(now)
        offered = sum(n.cpus for n in online)
        day.used_cpus.append(sum(n.used_cpus for n in online) / offered if offered else 0.0)
        gpus = sum(len(n.gpus) for n in online)
        day.used_gpus.append(sum(n.used_gpus for n in online) / gpus if gpus else 0.0)
        for members in self.rings.values():
            for i in members:
                if len(members) > 1 and rng.random() < config.fake_jobs_per_day / 24:
                    self.fake_job(self.nodes[i], self.nodes[rng.choice([m for m in members if m != i])])
        if now + HOUR_MS < EPOCH_MS + config.days * DAY_MS:
            self.engine.at(now + HOUR_MS, self.hourly)

    def fake_job(self, client: Node, provider: Node) -> None:
        """Two ring members pay each other for a job that never ran and rate it 100 (real receipts and records)."""
        self.fake += 1
        now = self.engine.now
        digest = hashlib.sha256(f"fake/{self.fake}".encode()).digest()
        receipt = Receipt(job_id=f"fake{self.fake}", client=client.peer, provider=provider.peer,
                          agreement_hash=digest, result_hash=digest, usage=Usage(cpu_ms=60_000, wall_ms=60_000),
                          cost=self.rng.randint(1000, 5000), issued_at=now)  # fmt: skip
        signed = self.rng.random() < self.config.sign_sample
        if signed:
            receipt = sign_as(provider.identity, sign_as(client.identity, receipt, "client"), "provider")
        self.market.rate(client.identity, provider.peer, receipt, Outcome.SUCCESS, signed)
        self.market.rate(provider.identity, client.peer, receipt, Outcome.SUCCESS, signed)

    def run(self) -> dict[str, Any]:
        self.engine.at(EPOCH_MS, self.hourly)
        for job in self.jobs:
            self.engine.at(job.submitted, self.submit, job)
        # Jobs submitted near the end get time to finish: run one day past the last submission.
        self.engine.run_until(EPOCH_MS + (self.config.days + 1) * DAY_MS)
        summary = self.measures.summary()
        summary["model"] = {
            "nodes": self.config.nodes,
            "events": self.engine.events,
            "messages": self.link.sent,
            "messages_lost": self.link.lost,
            "duplicates_dropped": self.link.duplicates_dropped,
            "records": self.records.count,
            "signed_bundles_verified": self.market.signed_bundles,
            "trust_computations": self.view.computations,
        }
        return summary


def simulate(config: SimConfig, seed: int, modes: tuple[str, ...] = MODES) -> dict[str, dict[str, Any]]:
    """Run every mode; returns the measures by mode (plain data, deterministic for a seed)."""
    return {mode: World(config, seed, mode).run() for mode in modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--days", type=int, default=DEFAULTS.days)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: coop,eigentrust,off")
    parser.add_argument("--verify-below", type=float, default=DEFAULTS.verify_below)
    parser.add_argument("--k", type=int, default=DEFAULTS.k)
    parser.add_argument("--half-life-days", type=float, default=DEFAULTS.half_life_days)
    parser.add_argument("--json", type=Path, help="write the measures here")
    parser.add_argument("--plot", type=Path, help="write PNG figures into this directory (needs matplotlib)")
    args = parser.parse_args(argv)
    config = dataclasses.replace(SimConfig(), nodes=args.nodes, days=args.days, verify_below=args.verify_below,
                                 k=args.k, half_life_days=args.half_life_days)  # fmt: skip
    modes = tuple(m for m in args.modes.split(",") if m)
    results: dict[str, dict[str, Any]] = {}
    runtime: dict[str, float] = {}
    for mode in modes:
        started = time.perf_counter()
        results[mode] = World(config, args.seed, mode).run()
        runtime[mode] = time.perf_counter() - started
        model = results[mode]["model"]
        print(f"[{mode}] {model['events']} events, {model['records']} records, "
              f"{model['trust_computations']} trust computations", file=sys.stderr)  # fmt: skip
    print(f"Coop simulation: {config.nodes} nodes, {config.days} days, seed {args.seed}, k={config.k}, "
          f"verify_below={config.verify_below}, half-life {config.half_life_days} days")  # fmt: skip
    print(report(results))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Not part of the results (they depend on the machine): how long this took and how much memory it used.
    print("run time: " + ", ".join(f"{m} {s:.1f} s" for m, s in runtime.items()) + f"; peak RSS {peak_mib:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"config": dataclasses.asdict(config), "results": results}, indent=1))
    if args.plot:
        from scripts.sim.plots import plot_all

        for path in plot_all(results, args.plot, title=f"N = {config.nodes}, seed {args.seed}"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
