"""Prometheus metrics of the control plane, served at ``GET /metrics`` (any logged-in role).

What the store knows (expiry, generations, nodes in sync) is read at scrape time, so every
control plane sharing a store reports the same; rollout counts and durations are this
process's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clustercert.clock import parse_iso
from clustercert.control.state import AppliedRecord, CertRecord, ClusterState, NodeRecord, proves

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class _Snapshot:
    """What the store said at the start of a scrape (read off the event loop)."""

    nodes: list[NodeRecord]
    certificates: list[CertRecord]
    applied: dict[int, dict[str, AppliedRecord]]


class _StoreCollector(Collector):
    """Renders the snapshot a scrape took: prometheus_client collects synchronously."""

    def __init__(self) -> None:
        self.snapshot = _Snapshot([], [], {})

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
        nodes, applied = self.snapshot.nodes, self.snapshot.applied
        for record in self.snapshot.certificates:
            expiry = parse_iso(record.not_after)
            not_after.add_metric([record.name], expiry.timestamp())
            generation.add_metric([record.name], record.generation)
            proven = [applied.get(n.node_id, {}).get(record.name) for n in nodes]
            in_sync.add_metric(
                [record.name],
                sum(1 for p in proven if proves(p, record.generation)),
            )
        total = GaugeMetricFamily("clustercert_nodes", "Nodes that joined the cluster.")
        total.add_metric([], len(nodes))
        yield from (not_after, generation, in_sync, total)


class Metrics:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        self._store = _StoreCollector()
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
            )
            return generate_latest(self.registry)
