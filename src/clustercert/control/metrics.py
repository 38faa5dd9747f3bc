"""Prometheus metrics of the control plane, served at ``GET /metrics`` (any logged-in role).

What the store knows (expiry, generations, nodes in sync) is read at scrape time, so every
control plane sharing a store reports the same; rollout counts and durations are this
process's own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clustercert.clock import parse_iso, utc_now
from clustercert.control.alerts import ALERT_NAMES, AlertState
from clustercert.control.state import ClusterState
from clustercert.expiry import expiration_family

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StoreCollector(Collector):
    def __init__(
        self,
        state: ClusterState,
        clock: Callable[[], dt.datetime],
        node: str,
        own_files: Callable[[], Mapping[str, Path]],
    ) -> None:
        self.state = state
        self.clock = clock
        self.node = node
        self.own_files = own_files

    def collect(self) -> Iterator[GaugeMetricFamily]:
        not_after = GaugeMetricFamily(
            "clustercert_certificate_not_after_timestamp_seconds",
            "When each certificate expires (Unix time).",
            labels=["name"],
        )
        generation = GaugeMetricFamily(
            "clustercert_certificate_generation",
            "The desired generation of each certificate.",
            labels=["name"],
        )
        in_sync = GaugeMetricFamily(
            "clustercert_certificate_nodes_in_sync",
            "Nodes that proved (by handshake) they serve the desired generation.",
            labels=["name"],
        )
        # The agents' node_cert_expiration_seconds labels, so rules can join the two views
        # on (cluster, logical_name).
        expiration = GaugeMetricFamily(
            "clustercert_certificate_expiration_seconds",
            "Seconds until each desired certificate expires (source: internal or user).",
            labels=["cluster", "logical_name", "source"],
        )
        cluster, now = self.state.cluster_name(), self.clock()
        nodes = self.state.nodes()
        applied = {n.node_id: self.state.applied(n.node_id) for n in nodes}
        for record in self.state.certificates():
            expiry = parse_iso(record.not_after)
            not_after.add_metric([record.name], expiry.timestamp())
            expiration.add_metric(
                [cluster, record.name, record.source], (expiry - now).total_seconds()
            )
            generation.add_metric([record.name], record.generation)
            proven = [applied[n.node_id].get(record.name) for n in nodes]
            in_sync.add_metric(
                [record.name],
                sum(1 for p in proven if p and p.ok and p.generation == record.generation),
            )
        total = GaugeMetricFamily("clustercert_nodes", "Nodes that joined the cluster.")
        total.add_metric([], len(nodes))
        yield from (not_after, expiration, generation, in_sync, total)
        # What this control plane serves and holds itself, in the agents' series.
        yield expiration_family(cluster, self.node, self.own_files(), now)


class Metrics:
    """``node`` and ``own_files`` label and list the certificate files this control plane
    itself serves or holds (its API listener's, its internode identity, the internal CA)."""

    def __init__(
        self,
        state: ClusterState,
        clock: Callable[[], dt.datetime] = utc_now,
        *,
        node: str = "control-plane",
        own_files: Callable[[], Mapping[str, Path]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(state, clock, node, own_files))
        self.rollouts = Counter(
            "clustercert_rollouts",
            "Certificate rollouts by result (ok, or the error_code that ended them).",
            ["result"],
            registry=self.registry,
        )
        self.rollout_seconds = Histogram(
            "clustercert_rollout_duration_seconds",
            "Wall time of a rollout, from taking the lock to every node's proof.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )

        self.alert_active = Gauge(
            "clustercert_alert_active",
            "1 while the alert (alert_settings, GET /v1/cluster/alerts) is raised, else 0.",
            ["alert"],
            registry=self.registry,
        )
        for alert in ALERT_NAMES:
            self.alert_active.labels(alert).set(0)
        self.webhook_notifications = Counter(
            "clustercert_webhook_notifications",
            "Alert notifications by outcome (ok, refused, failed after retries, dropped).",
            ["result"],
            registry=self.registry,
        )

    def set_alerts(self, states: Mapping[str, AlertState]) -> None:
        for name, state in states.items():
            self.alert_active.labels(name).set(1 if state.raised else 0)

    def observe_webhook(self, result: str) -> None:
        self.webhook_notifications.labels(result).inc()

    def observe_rollout(self, result: str, seconds: float) -> None:
        self.rollouts.labels(result).inc()
        self.rollout_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
