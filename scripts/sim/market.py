"""A job's life in the simulation, driving the project's own market code.

For each run of a job (the primary, then verification replicas ``-v1``/``-v2``):

1. discovery: up to ``discovery_sample`` fitting online providers sampled at random (a model of the DHT's
   provider hints), those the client trusts below ``REFUSE_BELOW`` dropped (``protocol.verification``), the
   first ``k`` asked;
2. one :class:`~protocol.negotiation.ClientNegotiation` per candidate and, at the provider, a
   :class:`~protocol.negotiation.ProviderNegotiation` quoting with :class:`~protocol.market.MarketPolicy`
   (admission, surge with load, counter-offers), every message over the simulated link, with real Ed25519
   signatures on the Agreement;
3. :func:`~protocol.market.rank_offers` with the client's trust (or a random pick with reputation off), accept,
   withdraw from the rest; nobody left: :func:`~protocol.market.explain_failures`;
4. the provider runs the job (capacity held, speed, crash risk), the cost comes from
   :func:`~protocol.pricing.cost_of` under the agreed sheet, a :class:`~protocol.messages.Receipt` is made (both
   signatures real for a sample) and the provider rates the client;
5. :func:`~protocol.verification.needs_replica` on the client's trust decides on a replica; differing results
   get a third run and :func:`~protocol.verification.majority` decides; each run is rated as
   ``node/market/jobs.py`` rates it, and the records become evidence for everyone's trust.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from protocol import verification
from protocol.cosign import sign_as, terms_hash
from protocol.market import MarketPolicy, Offer, explain_failures, rank_offers, resource_class
from protocol.messages import Agreement, Outcome, QuoteRequest, Receipt, RejectCode, ReputationRecord, Usage
from protocol.negotiation import ClientNegotiation, Completed, Failed, ProviderNegotiation, Quoted, Send
from protocol.pricing import cost_of, worst_case_cost
from protocol.reputation import make_bundle, verify_bundle
from protocol.trust import Evidence
from scripts.sim.engine import Engine, Link
from scripts.sim.measures import Measures
from scripts.sim.population import (
    DISHONEST,
    EPOCH_MS,
    HOUR_MS,
    REFERENCE_SHEET,
    Job,
    Node,
    SimConfig,
    new_identity,
)
from scripts.sim.trustviews import RecordIndex

STALL_MS = 15_000  # the client notices a dead provider after missed heartbeats (STALL_TIMEOUT_S)
WAIT_FOR = frozenset({RejectCode.BUSY})


@dataclass
class Pair:
    provider: int
    client_machine: ClientNegotiation
    provider_machine: ProviderNegotiation | None = None
    cost: int | None = None
    failed: RejectCode | None = None
    settled: bool = False


@dataclass
class Round:
    job: Job
    request: QuoteRequest
    pairs: dict[int, Pair]
    open: int
    candidates: int
    ranked: list[Pair] = field(default_factory=list)
    accepting: Pair | None = None
    done: bool = False


class Market:
    def __init__(
        self,
        *,
        config: SimConfig,
        rng: random.Random,
        nodes: list[Node],
        engine: Engine,
        link: Link,
        view: Any,
        records: RecordIndex,
        measures: Measures,
    ) -> None:
        self.config = config
        self.rng = rng
        self.nodes = nodes
        self.engine = engine
        self.link = link
        self.view = view
        self.records = records
        self.measures = measures
        self.reputation = view.name != "off"
        self.online: list[int] = []
        self.by_peer = {n.peer: n.index for n in nodes}
        self.signed_bundles = 0

    # ----------------------------------------------------------------------------------------- discovery

    def trust(self, client: Node, provider: Node) -> float:
        return float(self.view.score(client.peer, provider.peer, self.engine.now))

    def candidates(self, job: Job) -> list[int]:
        pool, rng, nodes = self.online, self.rng, self.nodes
        found: list[int] = []
        seen: set[int] = set()
        for _ in range(10 * self.config.discovery_sample):
            if len(found) >= self.config.discovery_sample or not pool:
                break
            i = pool[rng.randrange(len(pool))]
            if i in seen or i in job.excluded or i == job.client:
                continue
            seen.add(i)
            if nodes[i].fits(job.resources):
                found.append(i)
        if self.reputation:
            client = nodes[job.client]
            found = [i for i in found if verification.worth_asking(self.trust(client, nodes[i]))]
        return found[: self.config.k]

    # ----------------------------------------------------------------------------------------- negotiation

    def start_round(self, job: Job) -> None:
        now = self.engine.now
        client = self.nodes[job.client]
        wire_id = f"j{job.index}" + (f"-v{job.phase}" if job.phase else "")
        request = QuoteRequest(job_id=wire_id, client=client.peer, resources=job.resources, limits=job.limits,
                               max_price=job.max_price, deadline=job.deadline)  # fmt: skip
        chosen = self.candidates(job)
        rnd = Round(job=job, request=request, pairs={}, open=len(chosen), candidates=len(chosen))
        if not chosen:
            self.round_failed(rnd)
            return
        for i in chosen:
            machine = ClientNegotiation(identity=client.identity, request=request, provider=self.nodes[i].peer)
            pair = rnd.pairs[i] = Pair(i, machine)
            self.client_actions(rnd, pair, machine.start(now))

    def at_provider(self, rnd: Round, pair: Pair, message: Any) -> None:
        provider, now = self.nodes[pair.provider], self.engine.now
        if pair.provider_machine is None:
            if not (provider.alive and provider.online):
                return  # gone: the client's machine times out
            policy = MarketPolicy(
                floor=provider.floor,
                load_permille=provider.load_permille,
                cpus=provider.cpus,
                memory_bytes=provider.memory_bytes,
                disk_bytes=1 << 40,
                gpu_models=provider.gpus,
                free_slots=provider.free_slots(rnd.job.resources),
            )
            pair.provider_machine = ProviderNegotiation(
                identity=provider.identity, policy=policy, load_permille=provider.load_permille
            )
        client = self.nodes[rnd.job.client]
        for action in pair.provider_machine.receive(message, now):
            if isinstance(action, Send):
                self.link.send(provider, client, self.at_client, rnd, pair, action.message)

    def at_client(self, rnd: Round, pair: Pair, message: Any) -> None:
        self.client_actions(rnd, pair, pair.client_machine.receive(message, self.engine.now))

    def on_timeout(self, rnd: Round, pair: Pair, deadline: int) -> None:
        if pair.client_machine.next_deadline() == deadline:
            self.client_actions(rnd, pair, pair.client_machine.on_timeout(self.engine.now))

    def client_actions(self, rnd: Round, pair: Pair, actions: list[Any]) -> None:
        client, provider = self.nodes[rnd.job.client], self.nodes[pair.provider]
        for action in actions:
            if isinstance(action, Send):
                self.link.send(client, provider, self.at_provider, rnd, pair, action.message)
                deadline = pair.client_machine.next_deadline()
                if deadline is not None:
                    self.engine.at(deadline, self.on_timeout, rnd, pair, deadline)
            elif isinstance(action, Quoted):
                pair.cost = action.cost
                self.settle(rnd, pair)
            elif isinstance(action, Failed):
                pair.failed = action.code
                if rnd.accepting is pair:
                    self.accept_next(rnd)
                else:
                    self.settle(rnd, pair)
            elif isinstance(action, Completed) and rnd.accepting is pair and not rnd.done:
                self.agreed(rnd, pair, action.agreement)

    def settle(self, rnd: Round, pair: Pair) -> None:
        if pair.settled:
            return
        pair.settled = True
        rnd.open -= 1
        if rnd.open > 0 or rnd.accepting is not None:
            return
        quoted = [p for p in rnd.pairs.values() if p.cost is not None and p.failed is None]
        client = self.nodes[rnd.job.client]
        if self.reputation:
            offers = [
                Offer(self.nodes[p.provider].peer, p.cost or 0, self.trust(client, self.nodes[p.provider]),
                      self.link.latency_ms(client, self.nodes[p.provider]))
                for p in quoted
            ]  # fmt: skip
            by_peer = {self.nodes[p.provider].peer: p for p in quoted}
            rnd.ranked = [by_peer[o.provider] for o in rank_offers(offers)]
        else:  # reputation off: a random pick among the fitting providers that quoted
            rnd.ranked = sorted(quoted, key=lambda p: p.provider)
            self.rng.shuffle(rnd.ranked)
        if len(quoted) >= 2:
            costs = [p.cost or 0 for p in quoted]
            mean = statistics.fmean(costs)
            if mean > 0:
                day = self.measures.day(self.engine.now)
                day.dispersion[resource_class(rnd.request)].append(statistics.pstdev(costs) / mean)
        self.accept_next(rnd)

    def accept_next(self, rnd: Round) -> None:
        while rnd.ranked:
            pair = rnd.ranked.pop(0)
            rnd.accepting = pair
            if pair.failed is None:
                self.client_actions(rnd, pair, pair.client_machine.accept(self.engine.now))
                return
        rnd.accepting = None
        if not rnd.done:
            self.round_failed(rnd)

    def agreed(self, rnd: Round, pair: Pair, agreement: Agreement) -> None:
        rnd.done = True
        for other in rnd.ranked:
            if other.failed is None:
                self.client_actions(rnd, other, other.client_machine.withdraw())
        rnd.ranked = []
        job = rnd.job
        reference = worst_case_cost(job.resources, job.limits, REFERENCE_SHEET)
        day = self.measures.day(self.engine.now)
        day.price_index[resource_class(rnd.request)].append(
            worst_case_cost(job.resources, job.limits, agreement.price_sheet) / reference
        )
        provider = self.nodes[pair.provider]
        delay = int(self.link.latency_ms(self.nodes[job.client], provider))
        self.engine.at(self.engine.now + delay, self.job_start, job, pair.provider, agreement, provider.identity)

    def round_failed(self, rnd: Round) -> None:
        rnd.done = True
        job, now = rnd.job, self.engine.now
        reasons = [p.failed for p in rnd.pairs.values() if p.failed is not None and p.failed != RejectCode.WITHDRAWN]
        if job.phase:  # a replica could not be had
            self.replica_unavailable(job)
            return
        if not reasons or set(reasons) <= WAIT_FOR:  # nobody fits right now, or all busy: the job queues
            job.busy_since = job.busy_since or now
            if now - job.busy_since < self.config.busy_patience_ms:
                self.engine.at(now + self.config.busy_retry_ms, self.start_round, job)
                return
        why = explain_failures(reasons, max_price=job.max_price, candidates=rnd.candidates or None)
        self.measures.failures[why.split(" (your max price")[0]] += 1
        self.fail(job)

    # ----------------------------------------------------------------------------------------- execution

    def job_start(self, job: Job, index: int, agreement: Agreement, identity: Any) -> None:
        provider, now = self.nodes[index], self.engine.now
        if not provider.alive or provider.free_slots(job.resources) == 0:
            self.attempt_failed(job, index)
            return
        if job.started is None:
            job.started = now
            self.measures.day(job.submitted).queue_s.append((now - job.submitted) / 1000)
        provider.used_cpus += job.resources.cpus
        provider.used_memory += job.resources.memory_bytes
        provider.used_gpus += job.resources.gpus
        provider.running.add(job.index)
        if job.phase == 0:
            self.measures.day(now).assigned[provider.role] += 1
        duration = int(min(job.work_s / provider.speed, job.limits.wall_seconds) * 1000)
        crash = 1 - math.exp(-self.config.crash_per_hour * duration / HOUR_MS)
        run = (job, index, agreement, identity)
        if self.rng.random() < crash:
            self.engine.at(now + int(duration * self.rng.random()), self.job_end, *run, True)
        else:
            self.engine.at(now + duration, self.job_end, *run, False)

    def release(self, provider: Node, job: Job) -> None:
        if job.index in provider.running:
            provider.running.discard(job.index)
            provider.used_cpus -= job.resources.cpus
            provider.used_memory -= job.resources.memory_bytes
            provider.used_gpus -= job.resources.gpus

    def result_of(self, provider: Node, job: Job) -> str:
        role, now = provider.role, self.engine.now
        if role == "sybil" or role == "colluder":
            return f"wrong:{role}"  # the group's shared wrong answer: two of them outvote an honest provider
        if role == "whitewasher":
            return f"wrong:whitewasher:{job.index}:{provider.index}"
        if role == "on-off":
            off = ((now - EPOCH_MS) // (self.config.onoff_period_h * HOUR_MS)) % 2 == 1
            if off and self.rng.random() < 0.5:
                return f"wrong:on-off:{job.index}:{provider.index}"
        return "ok"

    def job_end(self, job: Job, index: int, agreement: Agreement, identity: Any, crashed: bool) -> None:
        provider, now = self.nodes[index], self.engine.now
        self.release(provider, job)
        if crashed or not provider.alive:
            self.engine.at(now + STALL_MS, self.attempt_failed, job, index)
            return
        wall_ms = int(min(job.work_s / provider.speed, job.limits.wall_seconds) * 1000)
        cpu_ms = int(job.work_s * 1000 * job.resources.cpus)
        usage = Usage(cpu_ms=cpu_ms, wall_ms=wall_ms, peak_memory_bytes=job.resources.memory_bytes,
                      gpu_ms=wall_ms * job.resources.gpus)  # fmt: skip
        cost = cost_of(usage, agreement.price_sheet, max_cost=agreement.max_cost)
        day = self.measures.day(now)
        if job.phase:
            day.work_replica += cpu_ms / 1000
        else:
            day.work_primary += cpu_ms / 1000
        result = self.result_of(provider, job)
        client = self.nodes[job.client]
        receipt = Receipt(job_id=agreement.job_id, client=agreement.client, provider=agreement.provider,
                          agreement_hash=terms_hash(agreement), result_hash=hashlib.sha256(result.encode()).digest(),
                          usage=usage, cost=cost, issued_at=now)  # fmt: skip
        signed = self.rng.random() < self.config.sign_sample
        if signed:
            receipt = sign_as(identity, sign_as(client.identity, receipt, "client"), "provider")
        self.measures.spent[client.role] += cost
        self.measures.earned[provider.role] += cost
        self.rate(identity, client.peer, receipt, Outcome.SUCCESS, signed)  # the provider rates the client
        delay = int(self.link.latency_ms(provider, client))
        self.engine.at(now + delay, self.result_at_client, job, index, result, receipt, signed)

    def attempt_failed(self, job: Job, index: int) -> None:
        job.attempts += 1
        job.excluded.add(index)
        if job.attempts >= self.config.max_attempts:
            if job.phase:
                self.replica_unavailable(job)
            else:
                self.measures.failures[f"failed on {job.attempts} provider(s)"] += 1
                self.fail(job)
            return
        self.start_round(job)

    # ----------------------------------------------------------------------------------------- verification

    def result_at_client(self, job: Job, index: int, result: str, receipt: Receipt, signed: bool) -> None:
        job.runs.append((index, result))
        client = self.nodes[job.client]
        job.receipts.append((receipt, signed))
        if job.phase == 0:
            trust = self.trust(client, self.nodes[index]) if self.reputation else 0.5
            replicas = self.config.replicas if self.reputation else 1
            decision = verification.needs_replica(trust, verify_below=self.config.verify_below, replicas=replicas)
            if not decision.replicate:
                self.rate(client.identity, receipt.provider, receipt, Outcome.SUCCESS, signed)
                self.finish(job, result)
                return
            self.next_phase(job, index)
            return
        if job.phase == 1 and job.runs[0][1] != job.runs[1][1]:
            self.next_phase(job, index)
            return
        agreeing = verification.majority([r for _, r in job.runs])
        if agreeing is None:
            self.measures.disputed += 1
            self.fail(job)
            return
        for n, ((who, _), (rec, was_signed)) in enumerate(zip(job.runs, job.receipts, strict=True)):
            good = n in agreeing
            outcome = Outcome.SUCCESS if good else Outcome.BAD_RESULT
            self.rate(client.identity, rec.provider, rec, outcome, was_signed, score=100 if good else 0)
            if not good:
                self.measures.day(self.engine.now).caught[self.nodes[who].role] += 1
        self.finish(job, job.runs[agreeing[0]][1])

    def next_phase(self, job: Job, index: int) -> None:
        job.phase += 1
        job.attempts = 0
        job.busy_since = None
        job.excluded.add(index)
        self.start_round(job)

    def replica_unavailable(self, job: Job) -> None:
        if job.phase == 1:  # as jobs.py: accept the primary unverified, rating it a success
            self.measures.unverified += 1
            receipt, signed = job.receipts[0]
            client = self.nodes[job.client]
            self.rate(client.identity, receipt.provider, receipt, Outcome.SUCCESS, signed)
            self.finish(job, job.runs[0][1])
        else:  # two results differ and no third provider: disputed
            self.measures.disputed += 1
            self.fail(job)

    # ----------------------------------------------------------------------------------------- outcomes

    def finish(self, job: Job, result: str) -> None:
        job.done = True
        now = self.engine.now
        day = self.measures.day(job.submitted)
        day.completed += 1
        day.on_time += now <= job.deadline
        client = self.nodes[job.client]
        self.measures.by_role_completed[client.role] += 1
        if result != "ok":
            day.accepted_wrong[result.split(":")[1]] += 1

    def fail(self, job: Job) -> None:
        job.done = True
        self.measures.day(job.submitted).failed += 1

    def rate(
        self, identity: Any, ratee: str, receipt: Receipt, outcome: Outcome, signed: bool, *, score: int = 100
    ) -> None:
        """A record by ``identity`` about ``ratee``, bound to ``receipt``; really signed and checked when sampled."""
        record = ReputationRecord(rater=identity.peer_id, ratee=ratee, receipt_hash=terms_hash(receipt),
                                  outcome=outcome, score=score, time=self.engine.now)  # fmt: skip
        if signed:
            verified = verify_bundle(make_bundle(identity, record, receipt), now=self.engine.now)
            self.signed_bundles += 1
            evidence = Evidence.from_record(verified.record, cost=verified.cost)
        else:
            evidence = Evidence.from_record(record, cost=receipt.cost)
        self.records.add(evidence)
        if outcome is Outcome.BAD_RESULT:
            self.maybe_whitewash(ratee)

    def maybe_whitewash(self, peer: str) -> None:
        index = self.by_peer.get(peer)
        node = self.nodes[index] if index is not None else None
        if node is not None and node.peer == peer and node.role == "whitewasher" and node.alive:
            node.alive = False
            self.engine.at(self.engine.now + self.config.rejoin_delay_ms, self.rejoin, node.index)

    def rejoin(self, index: int) -> None:
        node = self.nodes[index]
        node.identity = new_identity(self.rng)
        node.peer = node.identity.peer_id
        self.by_peer[node.peer] = index
        node.alive = True
        self.measures.rejoins += 1

    def dishonest(self, index: int) -> bool:
        return self.nodes[index].role in DISHONEST
