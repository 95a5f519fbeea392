"""Prometheus metrics of one node, served as ``GET /metrics`` on the local API (token-protected like the rest).

Theory of operation: every node has its own :class:`prometheus_client.CollectorRegistry` (never the global one:
tests run many nodes, and a library user may embed one). Two kinds of metric live in it:

* latency histograms observed as things happen (a quote's round trip, a job's submit-to-end time), fed by
  hooks the daemon sets on the :class:`~node.market.jobs.JobManager`;
* everything else read at scrape time from where it is already counted (:class:`NodeCollector`): jobs by role
  and state and sandbox terminations from the store (so they survive restarts), refused streams, DHT and gossip
  counters from the libp2p host's ``statistics()``, reputation counters from the reputation service.

Nothing here does I/O of its own; ``render()`` is called by the API route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.net import NetStatistics
    from node.store import Store

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
QUOTE_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS_S: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# Terminations that are not the sandbox stopping the job ("exited" is the process ending on its own).
NOT_KILLS: Final = frozenset({"exited"})


class NodeCollector(Collector):
    """Reads the node's own counters when Prometheus scrapes (no double bookkeeping)."""

    def __init__(
        self,
        *,
        store: Store | None,
        net_statistics: Callable[[], NetStatistics] | None,
        reputation_statistics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._store = store
        self._net = net_statistics
        self._reputation = reputation_statistics

    def collect(self) -> Iterator[Metric]:
        if self._store is not None:
            jobs = GaugeMetricFamily("coop_jobs", "Jobs this node knows, by role and state", labels=["role", "state"])
            for (role, state), count in sorted(self._store.job_counts().items()):
                jobs.add_metric([role, state], count)
            yield jobs
            kills = CounterMetricFamily(
                "coop_sandbox_kills",
                "Jobs this node ran as a provider that the sandbox stopped, by reason",
                labels=["reason"],
            )
            for reason, count in sorted(self._store.termination_counts("provider").items()):
                if reason not in NOT_KILLS:
                    kills.add_metric([reason], count)
            yield kills
        if self._net is not None:
            yield from _net_metrics(self._net())
        if self._reputation is not None:
            stats = self._reputation()
            yield GaugeMetricFamily("coop_reputation_records", "Reputation records held", value=stats["records"])
            rep = CounterMetricFamily("coop_reputation_received", "Reputation records taken in, by path",
                                      labels=["path"])  # fmt: skip
            rep.add_metric(["gossip"], stats["accepted_by_gossip"])
            rep.add_metric(["pull"], stats["pulled"])
            yield rep
            refused = CounterMetricFamily("coop_reputation_rejected", "Reputation records refused, by reason",
                                          labels=["reason"])  # fmt: skip
            for reason, count in sorted(stats["rejected"].items()):
                refused.add_metric([reason], count)
            yield refused


def _net_metrics(s: NetStatistics) -> Iterator[Metric]:
    yield GaugeMetricFamily("coop_peers_connected", "Peers with an open connection", value=s.connected_peers)
    yield GaugeMetricFamily("coop_dht_routing_table_size", "Peers in the Kademlia routing table",
                            value=s.routing_table_size)  # fmt: skip
    yield CounterMetricFamily("coop_dht_records_rejected", "DHT records refused on re-validation",
                              value=s.dht_records_rejected)  # fmt: skip
    yield CounterMetricFamily("coop_dials_failed", "Outbound dials that failed", value=s.dials_failed)
    streams = CounterMetricFamily("coop_streams", "libp2p streams by what happened to them", labels=["event"])
    streams.add_metric(["opened"], s.streams_opened)
    streams.add_metric(["accepted"], s.streams_accepted)
    streams.add_metric(["dropped"], s.streams_dropped)  # the handler raised: the peer sent garbage
    streams.add_metric(["limited"], s.streams_limited)  # the peer was over its per-peer stream limit
    yield streams
    yield CounterMetricFamily("coop_frames_too_large", "Inbound frames over their cap", value=s.frames_too_large)
    yield CounterMetricFamily("coop_connections_refused", "Connections refused by the resource manager",
                              value=s.connections_refused)  # fmt: skip
    refused = CounterMetricFamily("coop_refused_frames", "Inbound streams refused, by reason", labels=["reason"])
    for reason, count in sorted(s.refused.items()):
        refused.add_metric([reason], count)
    yield refused
    gossip = CounterMetricFamily("coop_gossip_messages", "GossipSub messages by what became of them",
                                 labels=["event"])  # fmt: skip
    gossip.add_metric(["received"], s.gossip_received)
    gossip.add_metric(["rejected"], s.gossip_rejected)
    gossip.add_metric(["dropped"], s.gossip_dropped)
    gossip.add_metric(["published"], s.gossip_published)
    yield gossip


class NodeMetrics:
    """One node's registry: the latency histograms and the scrape-time collector."""

    def __init__(
        self,
        *,
        store: Store | None = None,
        net_statistics: Callable[[], NetStatistics] | None = None,
        reputation_statistics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.quote_latency = Histogram(
            "coop_quote_latency_seconds",
            "Time from asking a provider for a quote to its answer",
            buckets=QUOTE_BUCKETS_S,
            registry=self.registry,
        )
        self.job_latency = Histogram(
            "coop_job_latency_seconds",
            "Time from submitting a job to its end, by final state",
            labelnames=["state"],
            buckets=JOB_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(
            NodeCollector(store=store, net_statistics=net_statistics, reputation_statistics=reputation_statistics)
        )

    def observe_quote(self, latency_ms: float) -> None:
        self.quote_latency.observe(max(0.0, latency_ms) / 1000)

    def observe_job(self, state: str, created_ms: int, ended_ms: int) -> None:
        self.job_latency.labels(state=state).observe(max(0, ended_ms - created_ms) / 1000)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
