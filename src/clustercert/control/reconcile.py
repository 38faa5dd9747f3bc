"""The reconciler: a loop that brings every node to the desired generation of every certificate.

Each pass first finishes a rollout left in flight by a control plane that stopped half-way
(:meth:`Coordinator.resolve_in_flight`: abort if undecided, roll forward if decided), then asks
every node what it holds, discards what nobody desires, and pushes (stage + commit) what is
missing or was not verified. It takes the cluster lock without waiting, so it never races a
rollout; a node that keeps failing is retried with exponential backoff (capped by
``max_backoff``), except that a node whose agent did not even accept connections is probed
(a bare TCP connect) on every pass and retried as soon as it listens again. The first pass
runs as soon as the control plane starts: that is its crash recovery. One log line per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from clustercert.control.lock import cluster_lock
from clustercert.control.rollout import Coordinator
from clustercert.control.state import AppliedRecord, CertRecord, NodeRecord
from clustercert.errors import AgentUnavailable, ClusterCertError, UpdateInProgress
from clustercert.internode import StatusAnswer

__all__ = ["Reconciler"]

log = logging.getLogger("clustercert.reconcile")


class Reconciler:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        interval: float = 1.0,
        max_backoff: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.state = coordinator.state
        self.interval = interval
        self.max_backoff = max_backoff
        self._clock = clock
        self._retry_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._gone: set[int] = set()  # in backoff, and nothing listened at the last probe

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    @staticmethod
    def _missing(
        status: StatusAnswer, applied: dict[str, AppliedRecord], desired: Sequence[CertRecord]
    ) -> list[CertRecord]:
        """What ``desired`` the node does not hold (``status``) or has not proved (``applied``)."""
        missing = []
        for record in desired:
            entry = status.certificates.get(record.name)
            proven = applied.get(record.name)
            if (
                entry is None
                or entry.generation != record.generation
                or entry.fingerprint != record.fingerprint
                or proven is None
                or not proven.ok
                or proven.generation != record.generation
            ):
                missing.append(record)
        return missing

    async def _tidy(
        self, node: NodeRecord, status: StatusAnswer, desired: Sequence[CertRecord]
    ) -> None:
        """Remove what the node holds but nobody desires: names deleted while it was away, and
        generations staged by an update that was never decided (e.g. the control plane died)."""
        client = await self.coordinator.pool.client(node)
        generations = {r.name: r.generation for r in desired}
        try:
            for name, entry in status.certificates.items():
                if name not in generations:
                    await client.remove(name)
                    log.info("reconcile: removed %s from %s (no longer desired)", name, node.name)
                    continue
                for generation in entry.staged:
                    if generation > generations[name]:
                        await client.abort(name, generation)
                        log.info(
                            "reconcile: discarded undecided %s@%d on %s",
                            name,
                            generation,
                            node.name,
                        )
        except AgentUnavailable as exc:
            log.debug("reconcile: %s", exc.description)

    async def reconcile_node(
        self, node: NodeRecord, desired: Sequence[CertRecord], applied: dict[str, AppliedRecord]
    ) -> bool:
        """One node, one pass: True when it holds everything ``desired`` afterwards
        (``applied``: what it last proved)."""
        client = await self.coordinator.pool.client(node)
        try:
            status = await client.status()
        except AgentUnavailable as exc:
            log.debug("reconcile: %s", exc.description)
            return False
        await self._tidy(node, status, desired)
        missing = self._missing(status, applied, desired)
        if not missing:
            return True
        outcome = await self.coordinator.push(node, missing)
        names = ", ".join(f"{r.name}@{r.generation}" for r in missing)
        if outcome.ok:
            log.info("reconcile: %s now serves %s", node.name, names)
        else:
            log.warning("reconcile: %s did not take %s: %s", node.name, names, outcome.error)
        return outcome.ok

    async def run_once(self) -> bool:
        """One pass over every node due for it; True when every node is in sync. False at once
        when a rollout holds the lock (it does this work itself)."""
        try:
            async with cluster_lock(self.state, 0.0, role="reconciler"):
                await self.coordinator.resolve_in_flight()
                return await self._pass()
        except UpdateInProgress:
            return False

    async def _listening(self, node: NodeRecord) -> bool:
        """Whether anything accepts TCP connections at the node's agent address (cheap: no
        TLS, no request). Tells an agent that came back from one that is still gone."""
        address = urlsplit(node.agent_url)
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.hostname, address.port or 443),
                min(1.0, self.interval),
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wake_returned(self, nodes: list[NodeRecord], now: float) -> None:
        """A node in backoff whose agent did not listen and now does (it restarted, or its
        host came back) is retried at once instead of at the end of its backoff. A node that
        listens but fails (frozen, a service refusing) keeps its backoff."""
        waiting = [n for n in nodes if self._retry_at.get(n.node_id, 0.0) > now]
        listening = await asyncio.gather(*(self._listening(n) for n in waiting))
        for node, up in zip(waiting, listening, strict=True):
            if not up:
                self._gone.add(node.node_id)
            elif node.node_id in self._gone:
                log.info("reconcile: %s listens again; retrying it now", node.name)
                self._gone.discard(node.node_id)
                self._retry_at[node.node_id] = now

    async def _pass(self) -> bool:
        now = self._now()
        nodes = await self.state.nodes()
        await self._wake_returned(nodes, now)
        due = [n for n in nodes if self._retry_at.get(n.node_id, 0.0) <= now]
        # Read (and unseal) the desired certificates once per pass, not twice per node.
        desired = await self.state.certificates() if due else []
        applied = await self.state.applied_by_node() if due else {}
        results = await asyncio.gather(
            *(self.reconcile_node(n, desired, applied.get(n.node_id, {})) for n in due)
        )
        for node, ok in zip(due, results, strict=True):
            if ok:
                self._failures.pop(node.node_id, None)
                self._retry_at.pop(node.node_id, None)
                self._gone.discard(node.node_id)
            else:
                failures = self._failures.get(node.node_id, 0) + 1
                self._failures[node.node_id] = failures
                delay = min(self.max_backoff, self.interval * 2 ** min(failures - 1, 10))
                self._retry_at[node.node_id] = now + delay
        return len(due) == len(nodes) and all(results)

    def wake(self, node_id: int) -> None:
        """Retry ``node_id`` on the next pass (e.g. it just joined)."""
        self._retry_at.pop(node_id, None)
        self._failures.pop(node_id, None)

    async def run_forever(self) -> None:
        """Pass after pass, ``interval`` apart, the first one at once. Never stops on an error:
        a pass that fails is logged and the next one tries again."""
        while True:
            try:
                await self.run_once()
            except ClusterCertError as exc:
                log.warning("reconcile pass failed: %s", exc.description)
            except Exception:
                log.exception("reconcile pass failed unexpectedly")
            await asyncio.sleep(self.interval)
