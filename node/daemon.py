"""`node start`: one long-running node.

Theory of operation: :func:`run_node` opens the libp2p host (via :mod:`node.net`), then runs these services in
one nursery until SIGINT/SIGTERM:

* the local API (:mod:`node.api`), after writing api.json (0600) with its URL and a fresh token;
* one bootstrap keeper per bootstrap peer: connect, seed the routing table, refresh it; when the peer is down or
  drops, retry with doubling back-off up to ``bootstrap_retry_max_seconds``;
* the advertiser (unless ``--no-provide``): every ``ad_refresh_seconds`` probe capacity, sign a CapacityAd valid
  for ``ad_ttl_seconds`` and store it in the DHT under this node's own key; the same record is served to finders
  on ``/coop/ad/1.0.0`` (:mod:`node.finder`, which owns finding providers);
* the hint announcer (:mod:`node.hints`): provider records for the ad's resource classes, at start, when the
  classes change, and at a slower, backing-off pace than the ad (the DHT keeps them 48 h).

Wall-clock time (for signed expiry) comes from one callable, :attr:`Node.clock_ms`; everything else uses trio's
clock.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, NamedTuple, TextIO

import psutil
import trio

from node import hints, net
from node.api import FindQuery, new_token, serve_api, write_api_file
from node.api_dashboard import LoginCodes, dashboard_routes
from node.api_jobs import job_routes
from node.api_reputation import reputation_routes
from node.capacity.fake_nvml import nvml_from_env
from node.capacity.probe import probe
from node.capacity.summary import MachineCapacity, resource_classes
from node.config import API_FILE, DB_FILE, NodeConfig
from node.finder import Finder, FindStages, serve_ad
from node.lan import LanJoiner
from node.market.jobs import JobManager
from node.market.provider import ProviderService
from node.market.settle import answer_receipt_query
from node.market.wire import ChannelClosed, FrameChannel, Messenger, StreamChannel
from node.metrics import NodeMetrics
from node.net.liveness import PeerKeeper, keep_peers
from node.owner import OwnerService, load_source
from node.relays import RelayKeeper
from node.reputation.records import RecordStore
from node.reputation.service import ReputationService
from node.runtimes import job_uid_gid, resolve_all
from node.sandbox.doctor import collect_facts
from node.sandbox.executor import Executor
from node.store import Store
from node.work_root import choose_work_root, remove_if_empty
from protocol import codec
from protocol.envelope import seal
from protocol.errors import RemoteProtocolError
from protocol.identity import Identity
from protocol.market import JOB_PROTOCOL_ID, NEGOTIATE_PROTOCOL_ID, RECEIPT_PROTOCOL_ID
from protocol.messages import CapacityAd, GpuSpec, Outcome, Receipt, Runtime
from protocol.records import AD_PROTOCOL_ID, CAP_PREFIX, cap_key, select_ad_record, validate_ad_record
from protocol.reputation import REPUTATION_TOPIC, SYNC_PROTOCOL_ID

logger = logging.getLogger(__name__)

MAX_AD_ADDRS: Final = 8


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BootstrapState:
    address: str
    state: str = "connecting"
    peer_id: str | None = None
    attempts: int = 0
    last_error: str = ""


@dataclass
class AdState:
    seq: int = 0
    published_at_ms: int = 0
    expires_at_ms: int = 0
    last_error: str = ""
    classes: list[str] = field(default_factory=list)


class SignedAd(NamedTuple):
    record: bytes  # the envelope's bytes, as put in the DHT and served on /coop/ad/1.0.0
    ad: CapacityAd
    signed_at_ms: int
    expires_at_ms: int
    classes: list[str]  # the resource classes it offers (their provider hints follow, node/hints.py)


def ad_from_capacity(
    identity: Identity,
    cap: MachineCapacity,
    *,
    seq: int,
    config: NodeConfig,
    addrs: list[str],
    tier: str,
    runtimes: tuple[Runtime, ...] = (),
) -> CapacityAd:
    return CapacityAd(
        peer=identity.peer_id,
        seq=seq,
        cpus=cap.cpus,
        memory_bytes=cap.memory_bytes,
        disk_bytes=cap.disk_free_bytes,
        gpus=tuple(GpuSpec(model=g.model[:128], memory_bytes=g.memory_bytes) for g in cap.gpus),
        sandbox_tier=tier,
        price_sheet=config.price_sheet,
        load_permille=cap.load_permille,
        addrs=tuple(a for a in addrs if len(a) <= 256)[:MAX_AD_ADDRS],
        runtimes=runtimes,
    )


def record_validators(
    clock_ms: Callable[[], int], skew_ms: int
) -> tuple[Callable[[str, bytes], None], Callable[[str, list[bytes]], int]]:
    """The DHT's validate/select pair for ``/coop/`` records, checking expiry against ``clock_ms``."""

    def validate(key: str, value: bytes) -> None:
        if key.startswith(CAP_PREFIX):
            validate_ad_record(key, value, now=clock_ms(), max_skew_ms=skew_ms)
            return
        raise ValueError(f"no validator for DHT key {key[:40]!r}")

    def select(key: str, values: list[bytes]) -> int:
        return select_ad_record(key, values, now=clock_ms())

    return validate, select


def display_addrs(addrs: list[str]) -> list[str]:
    """Replace a wildcard listen address by this machine's IPv4 addresses (what a peer can dial)."""
    out: list[str] = []
    local: list[str] | None = None
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            if local is None:
                local = sorted(
                    a.address
                    for nics in psutil.net_if_addrs().values()
                    for a in nics
                    if a.family.name == "AF_INET" and a.address
                )
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in local]
        else:
            out.append(addr)
    return out


class Node:
    """The running node's state and services; also the local API's backend."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        identity: Identity,
        host: net.NetHost,
        clock_ms: Callable[[], int] = wall_clock_ms,
        out: TextIO = sys.stdout,
    ) -> None:
        self.config = config
        self.identity = identity
        self.host = host
        self.clock_ms = clock_ms
        self.out = out
        self.started_at = trio.current_time()
        self.bootstrap = [BootstrapState(a) for a in config.bootstrap]
        self.lan = LanJoiner(host, say=self.say)  # peers found by mDNS
        self.relays = RelayKeeper(host, config.relays, retry_max_s=config.bootstrap_retry_max_seconds, say=self.say)
        self.ad_state = AdState()
        self.classes_changed = trio.Event()  # set when an ad offers other classes: their hints follow
        self.capacity: MachineCapacity | None = None
        self._nvml = nvml_from_env(os.environ)
        self.sandbox_tier = "none"
        self.runtimes: tuple[Runtime, ...] = ()  # offered in the ad (set when the provider starts)
        self._signed: SignedAd | None = None  # our newest ad: served on /coop/ad/1.0.0 at once, then put in the DHT
        self.finder = Finder(host, peer_id=identity.peer_id, clock_ms=clock_ms, skew_ms=self._skew_ms,
                             own_ad=self._own_ad)  # fmt: skip
        self.find = self.finder.find
        self.find_peer_ids = self.finder.find_peer_ids
        self.jobs: JobManager | None = None
        self.store: Store | None = None
        self.reputation: ReputationService | None = None
        self.peer_keeper: PeerKeeper | None = None
        self.owner: OwnerService | None = None  # the owner policy (providers only)
        self.metrics: NodeMetrics | None = None
        self.login_codes: LoginCodes | None = None

    def extra_routes(self) -> list[Any]:
        routes: list[Any] = []
        if self.owner is not None:
            from node.api_owner import owner_routes

            routes += owner_routes(self.owner)
        if self.metrics is not None and self.login_codes is not None:
            routes += dashboard_routes(node=self, store=self.store, reputation=self.reputation, metrics=self.metrics,
                                       codes=self.login_codes)  # fmt: skip
        if self.reputation is not None and self.store is not None:
            routes += reputation_routes(self.reputation, self.store)  # before /v1/jobs/{id}: more specific
        if self.jobs is not None and self.store is not None:
            routes += job_routes(self.jobs, self.store, self.identity.peer_id)
        return routes

    def capacity_tuple(self) -> tuple[int, int, int, tuple[str, ...]]:
        cap = self.capacity or self.probe_capacity()
        if self.owner is not None:
            cap = self.owner.shape(cap)  # admission follows the owner's caps, never the raw machine
        return cap.cpus, cap.memory_bytes, cap.disk_free_bytes, tuple(g.model for g in cap.gpus)

    def say(self, text: str) -> None:
        print(f"coop: {text}", file=self.out, flush=True)

    def probe_capacity(self) -> MachineCapacity:
        self.capacity = probe(disk_path=self.config.data_dir, nvml=self._nvml)
        return self.capacity

    # ------------------------------------------------------------------------------------------- bootstrap

    async def keep_bootstrap_peer(self, state: BootstrapState) -> None:
        """Connect to one bootstrap peer and stay connected; back off while it is down."""
        delay = 1.0
        while True:
            lost = self.peer_keeper is not None and state.peer_id in self.peer_keeper.lost
            # A lost peer is the PeerKeeper's to redial (bounded, then blocked again): a dial of our own would
            # lift its negative-cache entry and hang on an unreachable address, and DHT walks would wait on it.
            if not lost and (state.peer_id is None or state.peer_id not in self.host.connected_peers()):
                state.attempts += 1
                try:
                    state.peer_id = await self.host.connect(state.address)
                    await self.host.bootstrap([state.address])
                except net.InvalidAddress as exc:
                    state.state = "invalid"
                    state.last_error = str(exc)
                    self.say(f"bootstrap address {state.address} is not usable: {exc}")
                    return
                except net.DialError as exc:
                    state.state = "unreachable"
                    state.last_error = str(exc)
                    self.say(f"bootstrap peer unreachable, retrying in {delay:.0f}s: {exc}")
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.config.bootstrap_retry_max_seconds)
                    continue
                state.state = "connected"
                state.last_error = ""
                delay = 1.0
                self.say(f"joined the network through {state.peer_id}")
            await trio.sleep(min(5.0, self.config.bootstrap_retry_max_seconds))

    # ------------------------------------------------------------------------------------------- advertising

    @property
    def _skew_ms(self) -> int:
        return int(self.config.clock_skew_seconds * 1000)

    def sign_ad(self) -> SignedAd:
        """Sign a fresh ad from the current capacity and serve it from now on (``ad_record``)."""
        cap = self.probe_capacity()
        if self.owner is not None:
            cap = self.owner.shape(cap)  # the ad follows the owner's caps and mode, never the raw machine
        now = self.clock_ms()
        last = max(self.ad_state.seq, self._signed.ad.seq if self._signed else 0)
        seq = max(now, last + 1)  # survives restarts: newer ads always have a higher seq
        ad = ad_from_capacity(
            self.identity, cap, seq=seq, config=self.config, addrs=self.addrs(), tier=self.sandbox_tier,
            runtimes=self.runtimes,
        )  # fmt: skip
        ttl_ms = int(self.config.ad_ttl_seconds * 1000)
        envelope = seal(self.identity, ad, now=now, ttl_ms=ttl_ms, nonce=secrets.token_bytes(16))
        classes = resource_classes(cap) if cap.cpus else []  # nothing offered: no hints either (node/hints.py)
        self._signed = SignedAd(codec.encode(envelope), ad, now, now + ttl_ms, classes)
        return self._signed

    async def put_ad(self, signed: SignedAd) -> None:
        """Put ``signed`` in the DHT under our cap key (a walk to the closest peers, then a PUT to each)."""
        await self.host.dht_put(cap_key(self.identity.peer_id), signed.record)
        if signed.classes != self.ad_state.classes:
            self.classes_changed.set()
            self.classes_changed = trio.Event()
        self.ad_state = AdState(seq=signed.ad.seq, published_at_ms=signed.signed_at_ms,
                                expires_at_ms=signed.expires_at_ms, classes=signed.classes)  # fmt: skip

    async def publish_ad(self) -> None:
        await self.put_ad(self.sign_ad())

    async def republish(self) -> None:
        """Publish the ad now (the owner policy changed what is offered); a failure waits for the next refresh."""
        try:
            await self.publish_ad()
        except (ValueError, RemoteProtocolError, net.NetError) as exc:
            self._ad_failed(exc)

    def _ad_failed(self, exc: Exception) -> None:
        self.ad_state.last_error = str(exc)
        self.say(f"could not publish the capacity ad (will retry): {exc}")

    async def advertise_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sign and serve a fresh ad every ``ad_refresh_seconds``; put it in the DHT, in the background after the
        first time, one put at a time.

        A put walks the DHT, and on a loaded or partitioned network it can take longer than an ad lives
        (py-libp2p waits 10 s for each unreachable peer). The ad we serve directly must not lapse meanwhile:
        tests/test_partition.py saw reachable providers answer "no ad" while their put waited on the cut half.
        """
        putting = False

        async def put(signed: SignedAd) -> None:
            nonlocal putting
            putting = True
            try:
                await self.put_ad(signed)
            except (ValueError, RemoteProtocolError, net.NetError) as exc:
                self._ad_failed(exc)
            finally:
                putting = False

        async with trio.open_nursery() as nursery:
            first = True
            while True:
                try:
                    signed = self.sign_ad()
                except ValueError as exc:
                    self._ad_failed(exc)
                else:
                    if first:
                        await put(signed)
                    elif not putting:
                        nursery.start_soon(put, signed)
                if first:
                    task_status.started()
                    first = False
                await trio.sleep(self.config.ad_refresh_seconds)

    # ------------------------------------------------------------------------------------------- finding

    def _own_ad(self) -> tuple[CapacityAd, int] | None:
        return None if self._signed is None else (self._signed.ad, self._signed.expires_at_ms)

    def ad_record(self) -> bytes | None:
        """The ad record we serve on ``/coop/ad/1.0.0``: our newest signed ad, until it expires."""
        signed = self._signed
        return signed.record if signed is not None and signed.expires_at_ms > self.clock_ms() else None

    # ------------------------------------------------------------------------------------------- API backend

    def addrs(self) -> list[str]:
        return display_addrs(self.host.addrs())

    def api_id(self) -> dict[str, Any]:
        return {"peer_id": self.identity.peer_id, "addrs": self.addrs()}

    def api_peers(self) -> dict[str, Any]:
        connected = set(self.host.connected_peers())
        routing = set(self.host.routing_table_peers())
        known = routing | connected
        return {
            "peers": [
                {"peer_id": p, "connected": p in connected, "in_routing_table": p in routing} for p in sorted(known)
            ]
        }

    def api_status(self) -> dict[str, Any]:
        cap = self.capacity
        stats = self.host.statistics()
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.addrs(),
            "uptime_s": round(trio.current_time() - self.started_at, 1),
            "provide": self.config.provide,
            "owner": self.owner.api_state() if self.owner is not None else None,
            "connected_peers": stats.connected_peers,
            "routing_table_size": stats.routing_table_size,
            "refused_streams": stats.refused,
            "limits": {"streams_limited": stats.streams_limited, "connections_refused": stats.connections_refused},
            "liveness": asdict(self.peer_keeper.statistics()) if self.peer_keeper else None,
            "gossip": {
                "received": stats.gossip_received,
                "rejected": stats.gossip_rejected,
                "dropped": stats.gossip_dropped,
                "published": stats.gossip_published,
            },
            "reputation": self.reputation.statistics() if self.reputation is not None else None,
            "capacity": None
            if cap is None
            else {
                "cpus": cap.cpus,
                "memory_bytes": cap.memory_bytes,
                "disk_free_bytes": cap.disk_free_bytes,
                "load_permille": cap.load_permille,
                "gpus": [{"index": g.index, "model": g.model, "memory_bytes": g.memory_bytes} for g in cap.gpus],
                "gpu_status": cap.gpu_status,
            },
            "ad": {
                "seq": self.ad_state.seq,
                "published_at_ms": self.ad_state.published_at_ms,
                "expires_at_ms": self.ad_state.expires_at_ms,
                "classes": self.ad_state.classes,
                "last_error": self.ad_state.last_error,
            }
            if self.config.provide
            else None,
            "mdns": self.lan.status(),
            "reach": self.relays.status(relay_service=self.config.relay_service),
            "bootstrap": [
                {"address": b.address, "state": b.state, "attempts": b.attempts, "last_error": b.last_error}
                for b in self.bootstrap
            ],
        }

    async def api_find(self, query: FindQuery) -> dict[str, Any]:
        """The providers, and how the DHT lookup for their hints went (``net.LookupTrace``: hops, queries, ms)."""
        trace, stages = net.LookupTrace(), FindStages()
        t = time.perf_counter()
        providers = await self.find(query, trace=trace, stages=stages)
        find_ms = round((time.perf_counter() - t) * 1000, 1)
        return {"providers": providers, "lookup": trace.as_dict() | stages.as_dict() | {"find_ms": find_ms}}


async def _wait_for_signal(cancel_scope: trio.CancelScope, node_say: Callable[[str], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            node_say(f"received {signal.Signals(signum).name}, shutting down")
            cancel_scope.cancel()
            return


async def run_node(config: NodeConfig, identity: Identity, *, out: TextIO = sys.stdout) -> None:
    """Run the node until SIGINT/SIGTERM (or cancellation)."""
    skew_ms = int(config.clock_skew_seconds * 1000)
    validate, select = record_validators(wall_clock_ms, skew_ms)
    store = Store.open(config.data_dir / DB_FILE)
    reputation = ReputationService(identity=identity, records=RecordStore(store.db), clock_ms=wall_clock_ms,
                                   sync_interval_s=config.sync_interval_seconds)  # fmt: skip
    try:
        async with net.open_host(
            seed=identity.seed(),
            listen=list(config.listen),
            dht_validate=validate,
            dht_select=select,
            gossip_topics={REPUTATION_TOPIC: reputation.validate_gossip},
            mdns=config.mdns,
            relay_service=config.relay_service,
            limits=net.NetLimits(**dict(config.net_limits)),  # type: ignore[arg-type]
        ) as host:
            reputation.host = host
            await _serve(config, identity, host, store, reputation, out)
    finally:
        store.close()
    (config.data_dir / API_FILE).unlink(missing_ok=True)
    print("coop: stopped", file=out, flush=True)


async def _serve(
    config: NodeConfig, identity: Identity, host: net.NetHost, store: Store, reputation: ReputationService, out: TextIO
) -> None:
    node = Node(config=config, identity=identity, host=host, out=out)
    node.store = store
    node.reputation = reputation
    messenger = Messenger(identity, wall_clock_ms, max_skew_ms=int(config.clock_skew_seconds * 1000))
    provider = await _make_provider(node, config, identity, messenger, store)
    try:
        if provider is not None:
            executor = provider.executor
            jobs_cpu = executor.jobs_cpu_seconds if executor is not None else lambda: 0.0
            load = load_source(os.environ, jobs_cpu)
            node.owner = OwnerService(policy=config.owner, probe=node.probe_capacity, load=load, executor=executor,
                                      provider=provider, publish=node.republish, clock_ms=wall_clock_ms,
                                      check_seconds=config.owner_check_seconds, say=node.say)  # fmt: skip
        jobs_dir = config.data_dir / "jobs"
        jobs_dir.mkdir(exist_ok=True)
        node.jobs = JobManager(identity=identity, messenger=messenger, store=store, host=host,
                               find_providers=node.find_peer_ids, provider=provider, jobs_dir=jobs_dir,
                               clock_ms=wall_clock_ms, reputation=reputation, verify_below=config.verify_below,
                               replicas=config.replicas, max_active=config.max_active_jobs,
                               max_unfinished=config.max_unfinished_jobs,
                               busy_patience_s=config.busy_patience_seconds)  # fmt: skip
        metrics = NodeMetrics(store=store, net_statistics=host.statistics, reputation_statistics=reputation.statistics)
        node.metrics = metrics
        node.jobs.on_quote_latency = metrics.observe_quote
        node.jobs.on_job_ended = lambda row: metrics.observe_job(row.state, row.created_ms, row.updated_ms)
        if provider is not None:
            provider.on_receipt = partial(_rate_client, reputation)
            provider.open_channel = partial(_open_channel, host)
            host.set_stream_handler(NEGOTIATE_PROTOCOL_ID, _handler(provider.rpc_negotiate))
            host.set_stream_handler(JOB_PROTOCOL_ID, _handler(provider.rpc_job))
            host.set_stream_handler(AD_PROTOCOL_ID, _handler(partial(serve_ad, node.ad_record)))
        host.set_stream_handler(SYNC_PROTOCOL_ID, _handler(reputation.rpc_sync))
        host.set_stream_handler(RECEIPT_PROTOCOL_ID, _handler(partial(answer_receipt_query, messenger, store)))
        node.say(f"peer id {identity.peer_id}")
        for addr in node.addrs():
            node.say(f"listening on {addr}")
        shutdown = trio.Event()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_signal, scope, node.say)
                token = new_token()
                node.login_codes = LoginCodes(token)
                url = await nursery.start(
                    partial(serve_api, node, host=config.api_host, port=config.api_port, token=token, shutdown=shutdown)
                )
                write_api_file(config.data_dir / API_FILE, url=url, token=token, peer_id=identity.peer_id)
                node.say(f"local API on {url} (token in {config.data_dir / API_FILE})")
                for state in node.bootstrap:
                    nursery.start_soon(node.keep_bootstrap_peer, state)
                nursery.start_soon(net.keep_routing_table, host)  # a join's refresh can come back empty under load
                nursery.start_soon(node.lan.serve)
                nursery.start_soon(node.relays.serve)
                node.say(f"LAN discovery (mDNS): {host.mdns_state}")
                if not config.bootstrap:
                    node.say("no bootstrap peers: running as a one-node network that others can join")
                nursery.start_soon(reputation.consume_gossip)
                nursery.start_soon(reputation.sync_forever)
                node.peer_keeper = PeerKeeper(host, redial_max_s=config.bootstrap_retry_max_seconds)
                nursery.start_soon(keep_peers, node.peer_keeper)  # silent peers dropped, lost ones redialed
                await nursery.start(node.jobs.serve)
                if provider is not None:
                    assert node.owner is not None
                    await nursery.start(node.owner.serve)  # decides before the first ad
                    await nursery.start(node.advertise_forever)
                    await nursery.start(
                        partial(hints.announce_forever, first_interval=config.ad_refresh_seconds),
                        host, lambda: node.ad_state.classes, lambda: node.classes_changed,
                    )  # fmt: skip
                    assert node.capacity is not None
                    node.say(f"offering {describe_capacity(node.capacity)}, jobs sandboxed with {node.sandbox_tier}")
                else:
                    node.probe_capacity()
                    if config.provide:
                        node.say("not providing: no usable sandbox here (run `node doctor` for the fix)")
                    else:
                        node.say("not providing (--no-provide): this node only uses others' capacity")
                node.say("ready")
        shutdown.set()
    finally:
        if provider is not None:
            remove_if_empty(provider.work_root)


async def _rate_client(reputation: ReputationService, receipt: Receipt) -> None:
    await reputation.rate(receipt=receipt, outcome=Outcome.SUCCESS, score=100)


async def _make_provider(
    node: Node, config: NodeConfig, identity: Identity, messenger: Messenger, store: Store
) -> ProviderService | None:
    if not config.provide:
        return None
    facts = await trio.to_thread.run_sync(collect_facts)
    executor = Executor(facts=facts, max_concurrent=config.max_jobs, allow_unsandboxed=config.allow_unsandboxed)
    if executor.decision.tier is None:
        node.say(f"cannot run jobs: {executor.decision.reason}")
        return None
    node.sandbox_tier = executor.decision.tier.value
    uid, gid = job_uid_gid()
    runtimes = await trio.to_thread.run_sync(partial(resolve_all, dict(config.runtimes), job_uid=uid, job_gid=gid))
    for runtime in runtimes:
        if not runtime.usable:
            node.say(f"runtime {runtime.name} not offered: {runtime.error}")
    node.runtimes = tuple(r.wire() for r in runtimes if r.usable)
    work_root, stale = await trio.to_thread.run_sync(choose_work_root, config.data_dir)
    if stale:
        node.say(f"removed {stale} job work dir(s) left in {work_root} by a node that did not stop cleanly")
    return ProviderService(identity=identity, messenger=messenger, store=store, executor=executor,
                           work_root=work_root, price_sheet=config.price_sheet, capacity=node.capacity_tuple,
                           max_concurrent=config.max_jobs, clock_ms=wall_clock_ms, runtimes=runtimes)  # fmt: skip


async def _open_channel(host: net.NetHost, peer_id: str, protocol: str) -> FrameChannel:
    return StreamChannel(await host.open_stream(peer_id, protocol))


def _handler(rpc: Callable[[FrameChannel], Any]) -> Callable[[net.NetStream], Any]:
    async def handle(stream: net.NetStream) -> None:
        try:
            await rpc(StreamChannel(stream))
        except (ChannelClosed, trio.TooSlowError) as exc:
            logger.debug("%s stream from %s ended: %r", stream.protocol, stream.remote_peer, exc)
        except RemoteProtocolError:
            raise  # the adapter counts it against the peer and resets the stream
        except Exception:
            # A bug in our handler must not take the whole node down with it (libp2p would let it cancel the
            # host's nursery). Log it loudly, drop this one stream, keep serving everyone else.
            logger.exception("internal error in a %s handler (peer %s)", stream.protocol, stream.remote_peer)
            await stream.reset()

    return handle


def describe_capacity(cap: MachineCapacity) -> str:
    gib = 1 << 30
    return (
        f"{cap.cpus} CPUs, {cap.memory_bytes / gib:.1f} GiB memory, {cap.disk_free_bytes / gib:.0f} GiB disk free, "
        f"{cap.gpu_status}"
    )


def data_dir_lock(data_dir: Path) -> None:
    """Refuse to start a second node on the same data dir (its api.json names a live pid)."""
    import json

    path = data_dir / API_FILE
    try:
        pid = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return
        if "start" in cmdline:
            raise RuntimeError(f"another node (pid {pid}) is already running on {data_dir}")
