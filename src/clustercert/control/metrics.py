"""Prometheus metrics of the control plane, served at ``GET /metrics`` (any logged-in role).

What the store knows (expiry, generations, nodes in sync) is read at scrape time, so every
control plane sharing a store reports the same; rollout counts and durations, alert states and
webhook calls are this process's own. The certificate files this control plane serves or holds
itself (its API listener's, its internode identity, the internal CA) are in the agents' series,
``node_cert_expiration_seconds`` (:mod:`clustercert.expiry`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clustercert.clock import parse_iso, utc_now
from clustercert.control.alerts import ALERT_NAMES, AlertState
from clustercert.control.state import (
    AppliedRecord,
    CertRecord,
    ClusterState,
    NodeRecord,
    proves,
)
from clustercert.expiry import expiration_family

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class _Snapshot:
    """What the store said at the start of a scrape (read off the event loop)."""

    nodes: list[NodeRecord]
    certificates: list[CertRecord]
    applied: dict[int, dict[str, AppliedRecord]]
    cluster: str = ""
    now: dt.datetime = field(default_factory=utc_now)


class _StoreCollector(Collector):
    """Renders the snapshot a scrape took: prometheus_client collects synchronously."""

    def __init__(self, node: str, own_files: Callable[[], Mapping[str, Path]]) -> None:
        self.snapshot = _Snapshot([], [], {})
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
        snapshot = self.snapshot
        nodes, applied = snapshot.nodes, snapshot.applied
        for record in snapshot.certificates:
            expiry = parse_iso(record.not_after)
            not_after.add_metric([record.name], expiry.timestamp())
            expiration.add_metric(
                [snapshot.cluster, record.name, record.source],
                (expiry - snapshot.now).total_seconds(),
            )
            generation.add_metric([record.name], record.generation)
            proven = [applied.get(n.node_id, {}).get(record.name) for n in nodes]
            in_sync.add_metric(
                [record.name],
                sum(1 for p in proven if proves(p, record.generation)),
            )
        total = GaugeMetricFamily("clustercert_nodes", "Nodes that joined the cluster.")
        total.add_metric([], len(nodes))
        yield from (not_after, expiration, generation, in_sync, total)
        yield expiration_family(snapshot.cluster, self.node, self.own_files(), snapshot.now)


class Metrics:
    """``node`` and ``own_files`` label and list the certificate files this control plane
    itself serves or holds."""

    def __init__(
        self,
        state: ClusterState,
        clock: Callable[[], dt.datetime] = utc_now,
        *,
        node: str = "control-plane",
        own_files: Callable[[], Mapping[str, Path]] = dict,
    ) -> None:
        self.state = state
        self.clock = clock
        self.registry = CollectorRegistry()
        self._store = _StoreCollector(node, own_files)
        self.registry.register(self._store)
        self._rendering = asyncio.Lock()
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

        self.leader = Gauge(
            "clustercert_control_plane_leader",
            "1 while this control plane is the leader (runs the reconciler), else 0.",
            registry=self.registry,
        )
        self.agent_calls = Counter(
            "clustercert_agent_calls",
            "Internode calls this control plane made to agents, by call (status, watch, ...).",
            ["call"],
            registry=self.registry,
        )
        self.store_up = Gauge(
            "clustercert_store_up",
            "1 while the state store answers this control plane, 0 during an outage.",
            registry=self.registry,
        )
        self.store_up.set(1)

    def set_leader(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)

    def observe_agent_call(self, call: str) -> None:
        self.agent_calls.labels(call).inc()

    def set_alerts(self, states: Mapping[str, AlertState]) -> None:
        for name, state in states.items():
            self.alert_active.labels(name).set(1 if state.raised else 0)

    def observe_webhook(self, result: str) -> None:
        self.webhook_notifications.labels(result).inc()

    def observe_rollout(self, result: str, seconds: float) -> None:
        self.rollouts.labels(result).inc()
        self.rollout_seconds.observe(seconds)

    async def render(self) -> bytes:
        """The exposition text, with the store's figures as of now."""
        async with self._rendering:  # one snapshot per scrape, even when scrapes overlap
            self._store.snapshot = _Snapshot(
                await self.state.nodes(),
                await self.state.certificates(),
                await self.state.applied_by_node(),
                await self.state.cluster_name(),
                self.clock(),
            )
            # Reading the certificate files is blocking I/O too: off the loop.
            return await asyncio.to_thread(generate_latest, self.registry)
