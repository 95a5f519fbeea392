"""The simulated nodes and their jobs: capacity, owners' idle hours, floor prices, adversary roles.

Roles (a node has one):
    honest: provides (if it has spare capacity) and may consume; returns correct results.
    free-rider: consumes, never provides.
    sybil: one of a ring of fresh identities that praise each other through fake jobs, quote cheaply and always
        return the ring's wrong result.
    colluder: a member of a collusion group: praises the group, quotes cheaply, returns the group's wrong result.
    front: a collusion group member that works honestly (to earn real trust) and praises the colluders.
    on-off: honest for ``onoff_period`` hours, then wrong half of the time for as long, and so on.
    whitewasher: always wrong; once a bad-result record names it, it leaves and rejoins under a fresh identity.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Final

from protocol.identity import Identity
from protocol.messages import Limits, PriceSheet, Resources
from protocol.pricing import worst_case_cost

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
EPOCH_MS: Final = 1_767_225_600_000  # 2026-01-01T00:00Z: simulated time starts here (messages need Unix ms)
GIB: Final = 1 << 30
REFERENCE_SHEET: Final = PriceSheet(start_fee=10, per_cpu_second=10, per_gib_second=1, per_gpu_second=100)
GPU_MODELS: Final = ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-40GB")
REGIONS: Final = ((-6, 0.35), (1, 0.40), (8, 0.25))  # UTC offset in hours, share of nodes
ADVERSARIES: Final = ("sybil", "colluder", "on-off", "whitewasher")
DISHONEST: Final = frozenset({"sybil", "colluder", "on-off", "whitewasher"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything a run depends on besides the seed. Shares are of all nodes unless said otherwise."""

    nodes: int = 1000
    days: int = 4
    k: int = 5  # quotes asked per job (node/market/jobs.py DEFAULT_K)
    max_attempts: int = 3  # (MAX_ATTEMPTS)
    busy_patience_ms: int = 600_000  # how long a job queues while every fitting provider is busy (BUSY_PATIENCE_S)
    busy_retry_ms: int = 60_000  # the daemon retries every <= 5 s; 60 s here keeps the event count down
    discovery_sample: int = 20  # fitting providers a DHT lookup returns, before the trust filter and k
    verify_below: float = 0.7
    replicas: int = 2
    half_life_days: float = 30.0
    client_share: float = 0.30  # honest nodes that also submit jobs
    free_rider_share: float = 0.05
    sybil_share: float = 0.02
    colluder_share: float = 0.02
    front_share: float = 0.01
    onoff_share: float = 0.02
    whitewasher_share: float = 0.02
    gpu_share: float = 0.15  # of providers
    always_on_share: float = 0.20  # of providers: servers; the rest provide in their owner's idle hours
    jobs_per_client_day: float = 2.0
    gpu_job_share: float = 0.10
    loss: float = 0.01  # per message
    duplication: float = 0.005  # per message
    crash_per_hour: float = 0.02  # a provider dies during a job
    churn_per_day: float = 0.02  # providers that leave for good (as many new ones join)
    fake_jobs_per_day: int = 4  # per ring member: receipts among themselves, each rated 100
    onoff_period_h: int = 24
    rejoin_delay_ms: int = HOUR_MS
    sign_sample: float = 0.05  # share of receipts and records really signed and verified (verify_bundle)
    trust_refresh_ms: int = HOUR_MS  # a client recomputes its trust table at least this often
    trust_max_raters: int = 40  # raters whose records a client's trust computation sees (breadth first)
    trust_tolerance: float = 1e-6  # TrustParams.tolerance is 1e-12: see docs/simulation.md
    eigentrust_refresh_ms: int = 6 * HOUR_MS
    eigentrust_pretrusted: float = 0.01  # of honest always-on providers, fixed for the run


@dataclass(slots=True)
class Node:
    index: int
    identity: Identity
    peer: str
    role: str
    provides: bool
    consumes: bool
    cpus: int
    memory_bytes: int
    gpus: tuple[str, ...]
    floor: PriceSheet
    utc_offset: int
    always_on: bool
    speed: float
    base_latency_ms: float
    region: int
    alive: bool = True
    online: bool = True
    used_cpus: int = 0
    used_memory: int = 0
    used_gpus: int = 0
    running: set[int] = field(default_factory=set)

    @property
    def load_permille(self) -> int:
        return self.used_cpus * 1000 // max(1, self.cpus)

    def free_slots(self, resources: Resources) -> int:
        cpu = (self.cpus - self.used_cpus) // max(1, resources.cpus)
        mem = (self.memory_bytes - self.used_memory) // max(1, resources.memory_bytes)
        slots = min(cpu, mem)
        if resources.gpus:
            slots = min(slots, (len(self.gpus) - self.used_gpus) // resources.gpus)
        return max(0, slots)

    def fits(self, resources: Resources) -> bool:
        if resources.cpus > self.cpus or resources.memory_bytes > self.memory_bytes:
            return False
        return resources.gpus <= sum(1 for m in self.gpus if resources.gpu_model.lower() in m.lower())

    def idle_now(self, now: int) -> bool:
        """Whether the owner leaves the machine to the network: servers always, desktops 18:00-08:00 local."""
        hour = ((now - EPOCH_MS) // HOUR_MS + self.utc_offset) % 24
        return self.always_on or hour >= 18 or hour < 8


@dataclass(slots=True)
class Job:
    index: int
    client: int
    submitted: int
    deadline: int
    resources: Resources
    limits: Limits
    work_s: float  # CPU-seconds per requested CPU at speed 1
    max_price: int
    phase: int = 0  # 0: primary run, 1 and 2: verification replicas
    attempts: int = 0
    busy_since: int | None = None
    excluded: set[int] = field(default_factory=set)
    runs: list[tuple[int, str]] = field(default_factory=list)  # (provider, result) of each finished run
    receipts: list[tuple[Any, bool]] = field(default_factory=list)  # (Receipt, really signed) of each run
    reasons: list[str] = field(default_factory=list)
    started: int | None = None
    done: bool = False


def new_identity(rng: random.Random) -> Identity:
    return Identity.from_seed(hashlib.sha256(rng.randbytes(32)).digest())


def _role_counts(config: SimConfig) -> list[tuple[str, int]]:
    n = config.nodes
    counts = [
        ("sybil", max(2, round(n * config.sybil_share))),
        ("colluder", max(2, round(n * config.colluder_share))),
        ("front", max(1, round(n * config.front_share))),
        ("on-off", max(1, round(n * config.onoff_share))),
        ("whitewasher", max(1, round(n * config.whitewasher_share))),
        ("free-rider", max(1, round(n * config.free_rider_share))),
    ]
    honest = n - sum(c for _, c in counts)
    if honest < 10:
        raise ValueError(f"{n} nodes leave too few honest ones; use at least 100")
    return [("honest", honest), *counts]


def make_node(index: int, role: str, rng: random.Random, config: SimConfig, identity: Identity | None = None) -> Node:
    """A node of ``role`` with capacity, prices and an owner drawn from ``rng``."""
    identity = identity or new_identity(rng)
    r = rng.random()
    region = 0 if r < REGIONS[0][1] else 1 if r < REGIONS[0][1] + REGIONS[1][1] else 2
    provides = role != "free-rider"
    cpus = rng.choice((1, 2, 2, 4, 4, 8, 16))
    memory = cpus * rng.choice((2, 4, 4, 8)) * GIB
    gpus: tuple[str, ...] = ()
    if provides and rng.random() < config.gpu_share:
        gpus = (rng.choice(GPU_MODELS),) * rng.choice((1, 1, 2, 4))
    scale = math.exp(rng.gauss(0, 0.25))  # owners price around the reference, +-25 %
    if role in ("sybil", "colluder", "whitewasher"):
        scale *= 0.6  # cheats undercut to win jobs
    floor = PriceSheet(
        start_fee=REFERENCE_SHEET.start_fee,
        per_cpu_second=max(1, round(REFERENCE_SHEET.per_cpu_second * scale)),
        per_gib_second=max(1, round(REFERENCE_SHEET.per_gib_second * scale)),
        per_gpu_second=max(1, round(REFERENCE_SHEET.per_gpu_second * scale)),
    )
    return Node(
        index=index,
        identity=identity,
        peer=identity.peer_id,
        role=role,
        provides=provides,
        consumes=role in ("honest", "free-rider"),
        cpus=cpus,
        memory_bytes=memory,
        gpus=gpus,
        floor=floor,
        utc_offset=REGIONS[region][0],
        always_on=role != "honest" or rng.random() < config.always_on_share,
        speed=rng.uniform(0.7, 1.5),
        base_latency_ms=rng.uniform(5, 40),
        region=region,
    )


def build_population(config: SimConfig, rng: random.Random) -> list[Node]:
    roles = [role for role, count in _role_counts(config) for _ in range(count)]
    rng.shuffle(roles)
    nodes = [make_node(i, role, rng, config) for i, role in enumerate(roles)]
    for node in nodes:
        if node.role == "honest":
            node.consumes = rng.random() < config.client_share
    return nodes


def make_job(index: int, client: int, now: int, rng: random.Random, config: SimConfig) -> Job:
    """A job of mixed size: 1-8 CPUs, minutes to hours of work, sometimes a GPU, a deadline and a budget."""
    gpu = rng.random() < config.gpu_job_share
    cpus = rng.choice((1, 1, 2, 2, 4, 8))
    memory = cpus * rng.choice((1, 2, 4)) * GIB // 2
    work_s = min(12 * 3600.0, max(60.0, math.exp(rng.gauss(math.log(7200), 1.0))))
    wall = int(work_s * 2) + 60
    resources = Resources(
        cpus=cpus,
        memory_bytes=memory,
        disk_bytes=1 << 30,
        gpus=1 if gpu else 0,
        gpu_model=rng.choice(GPU_MODELS).split()[1] if gpu else "",
    )
    limits = Limits(cpu_seconds=cpus * wall, wall_seconds=wall, memory_bytes=memory, disk_bytes=1 << 30)

    budget = rng.choice((1.2, 1.5, 2.0, 3.0))
    max_price = int(worst_case_cost(resources, limits, REFERENCE_SHEET) * budget)
    slack = max(HOUR_MS, int(3 * work_s * 1000))
    return Job(index, client, now, now + slack, resources, limits, work_s, max_price)
