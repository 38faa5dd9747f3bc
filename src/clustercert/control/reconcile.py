"""The reconciler: brings every node to the desired generation of every certificate, and learns
a node's state when it changes instead of asking every node every second.

A pass first finishes a rollout left in flight by a control plane that stopped half-way
(:meth:`Coordinator.resolve_in_flight`: abort if undecided, roll forward if decided), then visits
the nodes **not known to be in sync**: asks what each holds, discards what nobody desires, and
pushes (stage + commit) what is missing or was not verified. It takes the cluster lock without
waiting, so it never races a rollout; a node that keeps failing is retried with exponential
backoff (capped by ``max_backoff``), except that a node whose agent did not even accept
connections is probed (a bare TCP connect) on every pass and retried as soon as it listens
again. The first pass visits every node as soon as the control plane starts: that is its crash
recovery. One log line per change.

A node a pass found holding the desired state is *known in sync*, and is then watched instead of
polled (docs/decisions.md, "Node status without polling"): the control plane keeps one status
request open on it (a long-poll, :meth:`NodeAgent.watch`), which the agent answers after about
``resync`` seconds, at once if it is a new incarnation (its boot id changed), or with an error
when it stops; a dead agent or host drops the connection (the kernel's TCP keepalive finds a
silent one). A watch that fails or answers something other than the desired state, a failed
internode call to the node (e.g. during a rollout, see :attr:`AgentPool.on_unavailable`), a new
desired certificate the node has not proved, or a new join puts the node back among those the
passes visit. With every node known in sync and no rollout left in flight, a pass costs three
small store reads and takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from clustercert.control.health import NodeHealth
from clustercert.control.lock import cluster_lock
from clustercert.control.outage import StoreOutage
from clustercert.control.rollout import Coordinator, Proofs
from clustercert.control.state import ROLLOUT_KEY, AppliedRecord, CertRecord, NodeRecord
from clustercert.errors import AgentUnavailable, ClusterCertError, StoreError, UpdateInProgress
from clustercert.internode import StatusAnswer

__all__ = ["WATCH_RESYNC", "Reconciler"]

# The default resync, in seconds: a watch on a node known in sync answers after half of it to
# all of it (docs/decisions.md, "Why 300 s").
WATCH_RESYNC = 300.0

log = logging.getLogger("clustercert.reconcile")


class Reconciler:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        interval: float = 1.0,
        max_backoff: float = 10.0,
        resync: float = WATCH_RESYNC,
        clock: Callable[[], float] | None = None,
        health: NodeHealth | None = None,
        outage: StoreOutage | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.outage = outage or StoreOutage()
        # What GET /v1/nodes shows as reachable / last_seen: every status answer or failure.
        self.health = health or NodeHealth()
        self.state = coordinator.state
        self.interval = interval
        self.max_backoff = max_backoff
        self.resync = resync
        self._clock = clock
        self._retry_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._gone: set[int] = set()  # in backoff, and nothing listened at the last probe
        # What the event-driven status knows (see the module docstring):
        self._in_sync: dict[int, str | None] = {}  # node -> boot id of the agent that proved it
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._nodes: dict[int, NodeRecord] = {}
        self._membership_seen: int | None = None  # store revision the node list was read at
        self._desired: list[CertRecord] = []
        self._desired_seen: tuple[tuple[str, int], ...] | None = None

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
        self,
        node: NodeRecord,
        desired: Sequence[CertRecord],
        applied: dict[str, AppliedRecord],
        status: StatusAnswer | None = None,
        proofs: Proofs | None = None,
    ) -> StatusAnswer | None:
        """One node, one pass: the status it answered when it holds everything ``desired``
        afterwards (``applied``: what it last proved), else None. ``status``: what the node
        answered since the desired state last changed (else it is asked). ``proofs``: where
        to leave what it proves for the caller to record (else recorded at once)."""
        if status is None:
            status = await self._inspect(node)
            if status is None:
                return None
        return await self._bring(node, status, desired, applied, proofs)

    async def _bring(
        self,
        node: NodeRecord,
        status: StatusAnswer,
        desired: Sequence[CertRecord],
        applied: dict[str, AppliedRecord],
        proofs: Proofs | None = None,
    ) -> StatusAnswer | None:
        """Tidy, pin and push what ``status`` shows the node lacks. Call with the lock held."""
        await self._tidy(node, status, desired)
        trust = self.coordinator.trust
        if trust is not None and not await trust.sync(node, status):
            return None  # a certificate could need a root the node does not pin yet
        missing = self._missing(status, applied, desired)
        if not missing:
            return status
        outcome = await self.coordinator.push(node, missing, proofs)
        names = ", ".join(f"{r.name}@{r.generation}" for r in missing)
        if outcome.ok:
            log.info("reconcile: %s now serves %s", node.name, names)
        else:
            log.warning("reconcile: %s did not take %s: %s", node.name, names, outcome.error)
        return status if outcome.ok else None

    async def run_once(self) -> bool:
        """One pass over every node due for it; True when every node is known in sync. False
        at once when a rollout holds the lock (it does this work itself). Takes no lock and
        asks no node when every node is known in sync and no rollout is left in flight.

        The cluster lock is held only for work that changes a node or the store (finishing a
        rollout left in flight, pushing, tidying, pinning roots), never while asking nodes
        that may not answer: an update waits on the reconciler only while it really works."""
        await self._follow_membership()
        # A rollout in flight has decided new generations but may not have recorded every
        # node's proof yet: compare proofs with the desired state only when none is. (Its
        # record is read only when the poll's change check finds one.)
        polled = await self.state.polled_revisions(recent=True)
        if ROLLOUT_KEY in polled and await self.state.rollout_in_flight() is not None:
            try:
                async with cluster_lock(self.state, 0.0, role="reconciler"):
                    await self.coordinator.resolve_in_flight()
            except UpdateInProgress:
                return False
        await self._follow_desired()
        if self._nodes.keys() <= self._in_sync.keys():
            return True
        return await self._pass()

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
                self.health.failed(node.node_id, f"nothing accepts connections at {node.agent_url}")
            elif node.node_id in self._gone:
                log.info("reconcile: %s listens again; retrying it now", node.name)
                self._gone.discard(node.node_id)
                self._retry_at[node.node_id] = now

    async def _inspect(self, node: NodeRecord) -> StatusAnswer | None:
        """Ask ``node`` for its status without the lock; None when it does not answer."""
        client = await self.coordinator.pool.client(node)
        try:
            status = await client.status()
        except AgentUnavailable as exc:
            log.debug("reconcile: %s", exc.description)
            self.health.failed(node.node_id, exc.description)
            return None
        self.health.answered(node.node_id)
        if self.coordinator.trust is not None:
            self.coordinator.trust.learn(node.node_id, status)
        return status

    async def _needs_work(
        self, status: StatusAnswer, desired: Sequence[CertRecord], applied: dict[str, AppliedRecord]
    ) -> bool:
        """Whether :meth:`reconcile_node` would change anything on a node that answered
        ``status``: something missing or unproved, something undesired, roots not pinned."""
        generations = {r.name: r.generation for r in desired}
        untidy = any(
            name not in generations or any(g > generations[name] for g in entry.staged)
            for name, entry in status.certificates.items()
        )
        trust = self.coordinator.trust
        unpinned = trust is not None and not await trust.holds_recorded(status)
        return untidy or unpinned or bool(self._missing(status, applied, desired))

    async def _pass(self) -> bool:
        now = self._now()
        nodes = [n for n in self._nodes.values() if n.node_id not in self._in_sync]
        await self._wake_returned(nodes, now)
        due = [n for n in nodes if self._retry_at.get(n.node_id, 0.0) <= now]
        # Read (and unseal) the desired certificates once per pass, not twice per node.
        seen = await self.state.desired_revisions(recent=True) if due else ()
        desired = await self.state.certificates() if due else []
        applied = await self.state.applied_by_node() if due else {}
        answers = await asyncio.gather(*(self._inspect(n) for n in due))
        results: dict[int, StatusAnswer | None] = {}
        working: dict[int, tuple[NodeRecord, StatusAnswer]] = {}
        for node, status in zip(due, answers, strict=True):
            if status is not None and await self._needs_work(
                status, desired, applied.get(node.node_id, {})
            ):
                working[node.node_id] = (node, status)
            else:
                results[node.node_id] = status
        if working:
            results.update(await self._work(list(working.values()), seen))
        for node in due:
            if node.node_id not in results:
                continue  # a live update held the lock: this node is visited again next pass
            answered = results[node.node_id]
            if answered is not None:
                self._failures.pop(node.node_id, None)
                self._retry_at.pop(node.node_id, None)
                self._gone.discard(node.node_id)
                self._watch(node, answered.boot_id)
            else:
                failures = self._failures.get(node.node_id, 0) + 1
                self._failures[node.node_id] = failures
                delay = min(self.max_backoff, self.interval * 2 ** min(failures - 1, 10))
                self._retry_at[node.node_id] = now + delay
        in_sync = (
            len(due) == len(nodes)
            and len(results) == len(due)
            and all(s is not None for s in results.values())
        )
        if in_sync and self.coordinator.trust is not None:
            # Phase c of a rollout that could not retire (a node lagged), now that all caught
            # up: it writes the trusted roots, so under the lock, never beside an update.
            with contextlib.suppress(UpdateInProgress):
                async with cluster_lock(self.state, 0.0, role="reconciler"):
                    if await self.state.rollout_in_flight() is None:
                        await self.coordinator.trust.retire(list(self._nodes.values()))
        return in_sync

    async def _work(
        self, nodes: Sequence[tuple[NodeRecord, StatusAnswer]], seen: tuple[tuple[str, int], ...]
    ) -> dict[int, StatusAnswer | None]:
        """Bring ``nodes`` (each answered the status paired with it, read while the desired
        state was at ``seen``, and needs something) to the desired state under the cluster
        lock, taken without waiting. If the desired state moved meanwhile, the nodes are asked
        again. Empty when an update holds the lock or is in flight (it does this itself)."""
        try:
            async with cluster_lock(self.state, 0.0, role="reconciler"):
                if await self.state.rollout_in_flight() is not None:
                    return {}
                fresh = await self.state.desired_revisions() == seen
                desired = await self.state.certificates()
                applied = await self.state.applied_by_node()
                # Every node's proofs in one store commit per 100, not one fsync per node (a
                # first sync of 1,000 nodes); a crash before it leaves them to be pushed again.
                proofs: Proofs = []
                done = await asyncio.gather(
                    *(
                        self.reconcile_node(
                            n, desired, applied.get(n.node_id, {}), status if fresh else None,
                            proofs,
                        )
                        for n, status in nodes
                    )
                )  # fmt: skip
                if proofs:
                    await self.state.record_applied_many(proofs)
        except UpdateInProgress:
            return {}
        return {n.node_id: status for (n, _), status in zip(nodes, done, strict=True)}

    async def forget(self, node_id: int) -> None:
        """The node left the cluster: drop its backoff, health and kept-alive connection."""
        self._retry_at.pop(node_id, None)
        self._failures.pop(node_id, None)
        self._gone.discard(node_id)
        self.health.forget(node_id)
        await self.coordinator.pool.forget(node_id)

    def wake(self, node_id: int) -> None:
        """Visit ``node_id`` on the next pass (e.g. it just joined, or joined again)."""
        self._retry_at.pop(node_id, None)
        self._failures.pop(node_id, None)
        self._membership_seen = None  # its record may be new or have a new URL
        self.suspect(node_id)

    async def run_forever(self) -> None:
        """Pass after pass, ``interval`` apart, the first one at once. Never stops on an error:
        a pass that fails is logged and the next one tries again. Cancelling it stops the
        watches too."""
        try:
            while True:
                try:
                    await self.run_once()
                except StoreError as exc:
                    self.outage.failed(exc, "reconciling the nodes")
                except ClusterCertError as exc:
                    log.warning("reconcile pass failed: %s", exc.description)
                except Exception:
                    log.exception("reconcile pass failed unexpectedly")
                await asyncio.sleep(self.interval)
        finally:
            await self.stop_watching()

    # --- event-driven status: who is known in sync, and the watches that keep it known --------

    def suspect(self, node_id: int) -> None:
        """``node_id`` is no longer known to be in sync (a call to it failed, its watch ended,
        it joined again): the next pass visits it. Cheap, and safe to call for any id."""
        self._in_sync.pop(node_id, None)
        watcher = self._watchers.pop(node_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    def known_in_sync(self) -> frozenset[int]:
        """The nodes whose state the control plane knows without asking (they are watched)."""
        return frozenset(self._in_sync)

    async def _follow_membership(self) -> None:
        """Re-read the node list only when the store says it may have changed (a node id was
        handed out) or :meth:`wake` asked: one small read per pass, not N."""
        revision = await self.state.membership_revision(recent=True)
        if revision == self._membership_seen:
            return
        self._membership_seen = revision
        nodes = {n.node_id: n for n in await self.state.nodes()}
        for node_id, node in self._nodes.items():
            if nodes.get(node_id) != node:
                self.suspect(node_id)  # removed, or its URL changed
        self._nodes = nodes

    async def _follow_desired(self) -> None:
        """When the desired certificates change (a rollout, a delete, another control plane),
        every node whose recorded proof does not match them is visited again: one read of the
        proofs, no call to any node. Nodes that proved them stay known in sync."""
        seen = await self.state.desired_revisions(recent=True)
        if seen == self._desired_seen:
            return
        self._desired_seen = seen
        self._desired = await self.state.certificates()
        applied = await self.state.applied_by_node()
        for node_id in list(self._in_sync):
            proofs = applied.get(node_id, {})
            for record in self._desired:
                proof = proofs.get(record.name)
                if proof is None or not proof.ok or proof.generation != record.generation:
                    self.suspect(node_id)
                    break

    def _holds_desired(self, status: StatusAnswer) -> bool:
        """Whether a watched node's answer is exactly the desired state: every desired name at
        its generation and fingerprint, nothing undesired, nothing staged beyond it."""
        desired = {r.name: r for r in self._desired}
        if status.certificates.keys() != desired.keys():
            return False
        for name, entry in status.certificates.items():
            record = desired[name]
            if (
                entry.generation != record.generation
                or entry.fingerprint != record.fingerprint
                or any(g > record.generation for g in entry.staged)
            ):
                return False
        return True

    def _watch(self, node: NodeRecord, boot_id: str | None) -> None:
        self._in_sync[node.node_id] = boot_id
        if node.node_id not in self._watchers:
            self._watchers[node.node_id] = asyncio.create_task(
                self._watching(node), name=f"watch {node.name}"
            )

    async def _watching(self, node: NodeRecord) -> None:
        """Hold a status long-poll on a node known in sync until something says it may not be.
        Each wait is ``resync`` seconds less up to half, at random, so a fleet that came up
        together does not answer together."""
        client = await self.coordinator.pool.client(node)
        try:
            while node.node_id in self._in_sync:
                boot_id = self._in_sync[node.node_id]
                wait = self.resync * (1 - random.random() / 2)
                try:
                    status = await client.watch(boot_id, wait)
                except AgentUnavailable as exc:
                    log.info("reconcile: lost %s (%s); visiting it", node.name, exc.description)
                    break
                if status.boot_id != boot_id:
                    log.info("reconcile: %s restarted; visiting it", node.name)
                    break
                if not self._holds_desired(status):
                    log.info("reconcile: %s holds other than the desired state", node.name)
                    break
                if boot_id is None:
                    await asyncio.sleep(wait)  # an agent too old to hold a watch: poll it slowly
        finally:
            if self._watchers.get(node.node_id) is asyncio.current_task():
                del self._watchers[node.node_id]
                self._in_sync.pop(node.node_id, None)

    async def stop_watching(self) -> None:
        watchers = list(self._watchers.values())
        self._watchers.clear()
        self._in_sync.clear()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
