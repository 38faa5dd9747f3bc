"""The two-phase rollout of DESIGN §6: lock, stage everywhere, decide, commit everywhere, verify.

Nothing reaches a node before validation passed (the caller hands over validated records). If
any node fails to stage, every node aborts and nothing changed anywhere. Once every node has
staged, the new generations are recorded as desired in one atomic store commit: from there the
change rolls forward, and nodes that fail to commit are left to the reconciler.

Crash safety rests on one store record, ``rollouts/current`` (:class:`RolloutRecord`): written
(phase ``staging``) before the first node stages, switched to ``decided`` by the very commit
that makes the new generations desired, deleted when the rollout ends. Whoever takes the
cluster lock next (the reconciler's first pass after a restart, or the next update) finds a
leftover record and finishes it: :meth:`Coordinator.resolve_in_flight` aborts an undecided
rollout on every node and rolls a decided one forward.

A certificate whose root some node does not trust yet adds two phases around these
(DESIGN §13, :mod:`clustercert.control.trust`): before staging, the root is pinned in every
node's trust bundle and proven (record phase ``trusting``); after every node committed, roots
nothing chains to any more are retired.

Read top to bottom: the entry points, then the protocol in its order (plan, trust, stage or
abort, decide, commit, verify, record, retire), then catching up (a retry, a roll-forward).
The lock is :mod:`clustercert.control.lock`, the test-only fault seam
:mod:`clustercert.control.faults`, the messages exchanged with the agents
:mod:`clustercert.internode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from clustercert.clock import iso, utc_now
from clustercert.control.agents import Agents
from clustercert.control.audit import CertificateEvent
from clustercert.control.faults import FaultPlan, Seam, no_seam, seam_for
from clustercert.control.lock import cluster_lock
from clustercert.control.outcomes import NodeOutcome, Progress
from clustercert.control.state import (
    AppliedRecord,
    CertRecord,
    ClusterState,
    NodeRecord,
    RolloutRecord,
    proves,
)
from clustercert.control.trust import TrustKeeper
from clustercert.errors import (
    AgentUnavailable,
    GenerationMismatch,
    NodesNotUpdated,
    StoreConflict,
    UpdateInProgress,
)
from clustercert.internode import CommitAnswer, ServiceProof

# NodeOutcome is re-exported for the API module, which imports it from here.
__all__ = ["Coordinator", "NodeOutcome", "Proofs"]

log = logging.getLogger("clustercert.rollout")

Proofs = list[tuple[int, str, AppliedRecord]]  # (node id, name, what it proved)


class Coordinator:
    """Runs rollouts of validated certificate records to every node."""

    def __init__(
        self,
        state: ClusterState,
        pool: Agents,
        *,
        lock_wait: float = 30.0,
        clock: Callable[[], dt.datetime] = utc_now,
        on_committed: Callable[[Sequence[CertRecord]], None] = lambda records: None,
        fault: FaultPlan | None = None,
        trust: TrustKeeper | None = None,
    ) -> None:
        self.state = state
        self.pool = pool
        self.trust = trust  # None: no trust phases (no redis trust bundles to keep)
        self.lock_wait = lock_wait
        self.clock = clock
        self.on_committed = on_committed
        self.fault = fault
        self.progress: Progress | None = None

    def progress_answer(self) -> dict[str, Any]:
        """The rollout this control plane is running, node by node (``in_progress`` false when
        none is): what ``GET /v1/cluster/certificates/rollout`` and the console answer."""
        return self.progress.as_json() if self.progress is not None else {"in_progress": False}

    # --- the entry points -----------------------------------------------------------------

    async def roll_out(
        self,
        proposed: Sequence[CertRecord],
        actor: str,
        expected: Mapping[str, int] | None = None,
    ) -> list[NodeOutcome]:
        """Make ``proposed`` (generation ignored) the certificates of every node.

        ``expected`` (name -> generation the caller read; 0: not set) makes it conditional:
        GenerationMismatch (409) when a name's desired generation moved, checked under the lock
        before anything is staged. Proposing what is already desired is never a mismatch (a
        retry of the caller's own update).

        Returns each node's outcome when every node serves them; raises NodesNotUpdated (409)
        when some node did not stage (nothing changed) or did not commit (the reconciler goes
        on), UpdateInProgress (409) when the lock stays busy. Idempotent: proposing what the
        store already desires creates no new generation; it succeeds at once when every node
        proved it, and otherwise pushes it to the nodes that lag (a retry after a 409).
        """
        seam = seam_for(self.fault)
        async with cluster_lock(self.state, self.lock_wait) as owner:
            await self.resolve_in_flight()
            await seam("after_validation", "")
            nodes = await self.state.nodes()
            fresh, resumed, current = await self._plan(proposed)
            _check_expected(fresh, current, expected or {})
            self.progress = Progress([r.name for r in proposed], {n.name: "waiting" for n in nodes})
            try:
                if fresh:
                    outcomes = await self._run(fresh, resumed, current, nodes, actor, owner, seam)
                else:
                    outcomes = await self._retry(resumed, nodes, actor)
            finally:
                self.progress = None
        await seam("before_response", "")
        failed = [o for o in outcomes if not o.ok]
        if failed:
            names = ", ".join(o.node.name for o in failed)
            raise NodesNotUpdated(
                f"{len(failed)} of {len(nodes)} nodes did not switch ({names}); the new "
                "certificate is recorded as desired and the reconciler keeps retrying them",
                step="commit",
                nodes=[o.as_json() for o in outcomes],
            )
        return outcomes

    async def remove(self, record: CertRecord, actor: str) -> list[NodeOutcome]:
        """Delete an optional certificate: from the store first (the decision), then from
        every node's disk. Nodes that cannot be reached now are cleaned by the reconciler;
        they are reported with NodesNotUpdated (409)."""
        async with cluster_lock(self.state, self.lock_wait):
            await self.resolve_in_flight()
            nodes = await self.state.nodes()
            await self.state.delete_certificate(record)

            async def remove_on(node: NodeRecord) -> NodeOutcome:
                client = await self.pool.client(node)
                try:
                    await client.remove(record.name)
                except AgentUnavailable as exc:
                    return NodeOutcome(node, ok=False, step="remove", error=exc.description)
                return NodeOutcome(node, step="remove")

            outcomes = await asyncio.gather(*(remove_on(n) for n in nodes))
            await self.state.add_event(
                CertificateEvent(
                    self.clock(),
                    actor,
                    "delete",
                    name=record.name,
                    generation=record.generation,
                    old_fingerprint=record.fingerprint,
                    nodes=[o.summary() for o in outcomes],
                )
            )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise NodesNotUpdated(
                f"{record.name} was deleted from the store, but {len(failed)} of {len(nodes)} "
                "nodes still hold its files; the reconciler removes them when they answer",
                step="remove",
                nodes=[o.as_json() for o in outcomes],
            )
        return list(outcomes)

    async def push(
        self, node: NodeRecord, records: Sequence[CertRecord], proofs: Proofs | None = None
    ) -> NodeOutcome:
        """Stage and commit ``records`` on one node (the reconciler and roll-forward use it).
        What it proved is recorded at once, or appended to ``proofs`` for the caller to record
        with other nodes' in one store commit."""
        staged = await self._stage_node(node, records, no_seam)
        if not staged.ok:
            return staged
        return await self._commit_node(node, records, no_seam, proofs)

    async def resolve_in_flight(self) -> None:
        """Finish the rollout a control plane left in flight (it died, or failed half-way):
        abort an undecided one on every node, roll a decided one forward to every node that
        has not proved it, write its audit event, forget it. Call with the cluster lock held.
        Nodes that do not answer are left to the reconciler (undecided files: ``_tidy``)."""
        record = await self.state.rollout_in_flight()
        if record is None:
            return
        decided = record.phase == "decided"
        trusting = record.phase == "trusting"
        log.warning(
            "rollout %s of %s (by %s at %s, lock owner %s) %s",
            record.rollout_id,
            ", ".join(f"{n}@{g}" for n, g in sorted(record.generations.items())),
            record.actor,
            record.started_at,
            record.owner,
            "was decided but not finished: rolling it forward"
            if decided
            else "stopped before its decision: aborting it on every node",
        )
        nodes = await self.state.nodes()
        if decided:
            desired = {r.name: r for r in await self.state.certificates()}
            records = [
                desired[name]
                for name, generation in sorted(record.generations.items())
                if name in desired and desired[name].generation == generation
            ]
            applied = await self.state.applied_by_node()
            outcomes = list(
                await asyncio.gather(
                    *(self._catch_up(n, records, applied.get(n.node_id, {})) for n in nodes)
                )
            )
            if records:
                self.on_committed(records)
            await self._audit_in_flight(record, outcomes, recovered=True)
        else:
            outcomes = await self._abort_everywhere(record, nodes, recovered=True)
            if trusting and self.trust is not None:
                # Stopped while pinning a new root: pin the recorded set again.
                await self.trust.restore(nodes)
        lagging = [o.node.name for o in outcomes if not o.ok]
        log.info(
            "rollout %s %s%s",
            record.rollout_id,
            "rolled forward" if decided else "aborted",
            f"; the reconciler goes on with {', '.join(lagging)}" if lagging else " everywhere",
        )
        await self.state.end_rollout(record)

    # --- the protocol, step by step -------------------------------------------------------

    async def _run(
        self,
        fresh: Sequence[CertRecord],
        resumed: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        nodes: Sequence[NodeRecord],
        actor: str,
        owner: str,
        seam: Seam,
    ) -> list[NodeOutcome]:
        """Stage, decide, commit ``fresh`` (new generations); ``resumed`` (already desired,
        same content) ride along without a new decision. Called with the lock held."""
        records = [*fresh, *resumed]
        added = await self.trust.needed(fresh) if self.trust is not None else []
        in_flight = await self._begin(fresh, current, actor, owner, added)
        if added:
            in_flight = await self._trust_first(in_flight, nodes, seam)
        staged = await asyncio.gather(*(self._stage_node(n, records, seam) for n in nodes))
        if not all(o.ok for o in staged):
            await self._abort_staged(in_flight, staged)
        try:
            decided = await self._decide(fresh, actor, in_flight)
        except UpdateInProgress:
            await self._abort_everywhere(in_flight, nodes)
            with contextlib.suppress(StoreConflict):
                await self.state.end_rollout(in_flight)
            raise
        log.info("rollout %s decided: %s", decided.rollout_id, _names(fresh))
        if self.progress is not None:
            self.progress.phase = "committing"
        await seam("after_decision", "")
        proofs: Proofs = []
        outcomes = list(
            await asyncio.gather(*(self._commit_node(n, records, seam, proofs) for n in nodes))
        )
        await self._record(records, current, actor, outcomes, proofs, nodes, decided)
        return outcomes

    # 1. plan: which records need a new generation, and the rollout record that says so

    async def _plan(
        self, proposed: Sequence[CertRecord]
    ) -> tuple[list[CertRecord], list[CertRecord], dict[str, CertRecord | None]]:
        """Split ``proposed`` into fresh records (numbered with their new generation) and
        resumed ones (already desired with the same content: a retry); also return what each
        name's desired record was before."""
        used = await self.state.generations_used()
        fresh: list[CertRecord] = []
        resumed: list[CertRecord] = []
        current: dict[str, CertRecord | None] = {}
        for item in proposed:
            existing = await self.state.certificate(item.name)
            current[item.name] = existing
            if (
                existing is not None
                and existing.fingerprint == item.fingerprint
                and existing.key == item.key
                and existing.certificate == item.certificate
            ):
                resumed.append(existing)
                continue
            # Above every generation ever staged, not only the desired one: an aborted
            # rollout's number is never reused (see ClusterState.generations_used).
            generation = max(existing.generation if existing else 0, used.get(item.name, 0)) + 1
            revision = existing.revision if existing else 0
            fresh.append(replace(item, generation=generation, revision=revision))
        return fresh, resumed, current

    async def _begin(
        self,
        fresh: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        owner: str,
        trust_added: list[str],
    ) -> RolloutRecord:
        record = RolloutRecord(
            rollout_id=secrets.token_hex(6),
            phase="trusting" if trust_added else "staging",
            generations={r.name: r.generation for r in fresh},
            fingerprints={r.name: r.fingerprint for r in fresh},
            previous={
                r.name: (c.fingerprint if (c := current.get(r.name)) else None) for r in fresh
            },
            actor=actor,
            owner=owner,
            started_at=iso(self.clock()),
            trust_added=trust_added,
        )
        try:
            return await self.state.begin_rollout(record)
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"another rollout is recorded in flight ({exc.description}); retry"
            ) from exc

    # 2. trust the new roots everywhere first (phase a; control/trust.py)

    async def _trust_first(
        self, in_flight: RolloutRecord, nodes: Sequence[NodeRecord], seam: Seam
    ) -> RolloutRecord:
        assert self.trust is not None
        if self.progress is not None:
            self.progress.phase = "trusting"
        started = asyncio.get_running_loop().time()
        staging = await self.trust.add(in_flight, nodes, seam)
        log.info(
            "rollout %s: every node trusts %d new root(s) (%.3f s)",
            in_flight.rollout_id,
            len(in_flight.trust_added),
            asyncio.get_running_loop().time() - started,
        )
        if self.progress is not None:
            self.progress.phase = "staging"
        return staging

    # 3. stage on every node, or abort on every node

    async def _stage_node(
        self, node: NodeRecord, records: Sequence[CertRecord], seam: Seam
    ) -> NodeOutcome:
        client = await self.pool.client(node)
        self._mark(node, "staging")
        try:
            for record in records:
                await client.stage(record.name, record.generation, record.certificate, record.key)
        except AgentUnavailable as exc:
            self._mark(node, "failed")
            return NodeOutcome(node, ok=False, step="stage", error=exc.description)
        self._mark(node, "staged")
        await seam("during_stage", node.name)
        return NodeOutcome(node, step="stage")

    async def _abort_staged(self, in_flight: RolloutRecord, staged: list[NodeOutcome]) -> NoReturn:
        """Some node failed to stage: abort on the nodes that staged, audit it, forget the
        rollout, raise 409. A node whose stage failed is not sent an abort: it may be the
        frozen one, and waiting out ``--agent-timeout`` for it a second time would only delay
        the answer; its undecided files are harmless and the reconciler's tidy removes them."""
        failed = [o for o in staged if not o.ok]
        await self._abort_everywhere(
            in_flight,
            [o.node for o in staged if o.ok],
            skipped=[
                NodeOutcome(o.node, ok=False, step="stage", error=f"not aborted: {o.error}")
                for o in failed
            ],
        )
        await self.state.end_rollout(in_flight)
        for outcome in staged:
            if outcome.ok:
                outcome.ok, outcome.error = False, "aborted: another node failed to stage"
        raise NodesNotUpdated(
            f"{len(failed)} of {len(staged)} nodes could not stage the certificate "
            f"({', '.join(o.node.name for o in failed)}); the update was aborted and no node "
            "changed",
            step="stage",
            nodes=[o.as_json() for o in staged],
        )

    async def _abort_everywhere(
        self,
        in_flight: RolloutRecord,
        nodes: Sequence[NodeRecord],
        skipped: Sequence[NodeOutcome] = (),
        *,
        recovered: bool = False,
    ) -> list[NodeOutcome]:
        """Abort ``in_flight`` on ``nodes`` (in parallel) and write its ``abort`` audit event
        with every node's outcome, ``skipped`` ones (not sent an abort) included."""
        outcomes = list(
            await asyncio.gather(*(self._abort_node(n, in_flight.generations) for n in nodes))
        )
        everyone = sorted([*outcomes, *skipped], key=lambda o: o.node.node_id)
        await self._audit_in_flight(in_flight, everyone, recovered=recovered)
        return outcomes

    async def _abort_node(self, node: NodeRecord, generations: dict[str, int]) -> NodeOutcome:
        client = await self.pool.client(node)
        for name, generation in sorted(generations.items()):
            try:
                await client.abort(name, generation)
            except AgentUnavailable as exc:
                # Staged files of an undecided generation are harmless: never current, replaced
                # by the next stage of that generation, and discarded by the reconciler's tidy.
                log.warning("abort on %s: %s", node.name, exc.description)
                return NodeOutcome(node, ok=False, step="abort", error=exc.description)
        return NodeOutcome(node, step="abort")

    # 4. decide

    async def _decide(
        self, records: Sequence[CertRecord], actor: str, in_flight: RolloutRecord
    ) -> RolloutRecord:
        """The decision: ONE atomic store commit makes every new generation desired and marks
        the rollout ``decided``. Before it, a crash means abort; after it, roll forward."""
        now = iso(self.clock())
        decided = replace(in_flight, phase="decided")
        desired = [replace(r, updated_at=now, updated_by=actor) for r in records]
        try:
            revision = await self.state.commit_decision(desired, decided, in_flight.revision)
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"the certificate changed while this update was staged ({exc.description}); retry"
            ) from exc
        return replace(decided, revision=revision)

    # 5. commit on every node; 6. verify what each node proved

    async def _commit_node(
        self,
        node: NodeRecord,
        records: Sequence[CertRecord],
        seam: Seam,
        proofs: Proofs | None = None,
    ) -> NodeOutcome:
        """Commit on one node. What it proved is recorded at once, or appended to ``proofs``
        for the caller to record in one store commit for every node (one fsync, not N)."""
        client = await self.pool.client(node)
        outcome = NodeOutcome(node, results=[])
        self._mark(node, "committing")
        for record in records:
            try:
                answer = await client.commit(record.name, record.generation)
            except AgentUnavailable as exc:
                outcome.ok, outcome.error = False, exc.description
                break
            assert outcome.results is not None
            outcome.results.append(answer)
            proof = self._verify(record, answer)
            if proofs is None:
                await self.state.record_applied(node.node_id, record.name, proof)
            else:
                proofs.append((node.node_id, record.name, proof))
            if not proof.ok:
                errors = answer.errors()
                outcome.ok = False
                outcome.error = "; ".join(errors) or f"{record.name} was not verified"
        self._mark(node, "verified" if outcome.ok else "failed")
        if outcome.ok:
            await seam("during_commit", node.name)
        return outcome

    def _verify(self, record: CertRecord, answer: CommitAnswer) -> AppliedRecord:
        """What a commit answer proves: ok only when every service serves ``record``."""
        return AppliedRecord(
            generation=record.generation,
            fingerprint=answer.fingerprint,
            ok=answer.ok and answer.fingerprint == record.fingerprint,
            services=[s.to_json() for s in answer.services],
            at=iso(self.clock()),
        )

    # 7. record: the proofs, the audit events; 8. retire roots nothing chains to (phase c)

    async def _retire(self, nodes: Sequence[NodeRecord], actor: str) -> None:
        assert self.trust is not None
        if self.progress is not None:
            self.progress.phase = "retiring"
        started = asyncio.get_running_loop().time()
        retired = await self.trust.retire(nodes, actor=actor)
        if retired:
            log.info(
                "retired %d root(s) in %.3f s",
                len(retired),
                asyncio.get_running_loop().time() - started,
            )

    async def _record(
        self,
        records: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        outcomes: Sequence[NodeOutcome],
        proofs: Proofs,
        nodes: Sequence[NodeRecord],
        decided: RolloutRecord,
    ) -> None:
        """Record the proofs, the update's audit event and the rollout's end. Usually in one
        store commit (one fsync or etcd round trip, not three or more). When a root may retire,
        one step after another instead: retiring reads the proofs, and the update's event comes
        after the retire event, so that it is the newest. A crash before the end is recorded
        leaves a decided rollout, rolled forward by the next lock holder (pushes are
        idempotent)."""
        if self.trust is not None and all(o.ok for o in outcomes) and await self.trust.retirable():
            await self.state.record_applied_many(proofs)
            await self._retire(nodes, actor)
            self.on_committed(records)
            for event in self._events(records, current, actor, outcomes):
                await self.state.add_event(event)
            await self.state.end_rollout(decided)
            return
        self.on_committed(records)
        await self.state.finish_rollout(
            proofs, self._events(records, current, actor, outcomes), decided
        )

    def _events(
        self,
        records: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        outcomes: Sequence[NodeOutcome],
        action: str = "update",
    ) -> list[CertificateEvent]:
        summaries = [o.summary() for o in outcomes]
        return [
            CertificateEvent(
                self.clock(),
                actor,
                action,
                name=record.name,
                generation=record.generation,
                old_fingerprint=old.fingerprint if (old := current.get(record.name)) else None,
                new_fingerprint=record.fingerprint,
                nodes=summaries,
            )
            for record in records
        ]

    async def _audit_in_flight(
        self, record: RolloutRecord, outcomes: Sequence[NodeOutcome], *, recovered: bool
    ) -> None:
        """The event of a rollout that ended without the normal path: ``update`` when
        :meth:`resolve_in_flight` rolled it forward, ``abort`` when it was aborted (live, or
        by crash recovery: ``recovered``, which names the rollout)."""
        decided = record.phase == "decided"
        for name, generation in sorted(record.generations.items()):
            await self.state.add_event(
                CertificateEvent(
                    self.clock(),
                    record.actor,
                    "update" if decided else "abort",
                    name=name,
                    generation=generation,
                    old_fingerprint=record.previous.get(name),
                    new_fingerprint=record.fingerprints.get(name) if decided else None,
                    nodes=[o.summary() for o in outcomes],
                    rollout_id=record.rollout_id if recovered else None,
                )
            )

    # --- catching up: a retry, or rolling a decided rollout forward -----------------------

    async def _retry(
        self, records: Sequence[CertRecord], nodes: Sequence[NodeRecord], actor: str
    ) -> list[NodeOutcome]:
        """A retry of what the store already desires: push it to the nodes that have not
        proved it; a no-op when none lags."""
        applied = await self.state.applied_by_node()
        lagging_anywhere = any(
            not proves(applied.get(n.node_id, {}).get(r.name), r.generation)
            for n in nodes
            for r in records
        )
        outcomes = list(
            await asyncio.gather(
                *(self._catch_up(n, records, applied.get(n.node_id, {})) for n in nodes)
            )
        )
        if lagging_anywhere:
            self.on_committed(records)
            for event in self._events(records, {}, actor, outcomes, action="retry"):
                await self.state.add_event(event)
        return outcomes

    async def _catch_up(
        self, node: NodeRecord, records: Sequence[CertRecord], applied: dict[str, AppliedRecord]
    ) -> NodeOutcome:
        """Push to ``node`` the ``records`` it has not proved (``applied``: what it proved);
        when it proved them all, its outcome reports what it proved."""
        lagging = [r for r in records if not proves(applied.get(r.name), r.generation)]
        if lagging:
            return await self.push(node, lagging)
        results = [
            CommitAnswer(
                r.name,
                entry.generation,
                entry.fingerprint,
                entry.ok,
                tuple(ServiceProof.from_json(s) for s in entry.services),
            )
            for r in records
            if (entry := applied.get(r.name)) is not None
        ]
        return NodeOutcome(node, results=results)

    def _mark(self, node: NodeRecord, state: str) -> None:
        if self.progress is not None and node.name in self.progress.nodes:
            self.progress.nodes[node.name] = state


def _check_expected(
    fresh: Sequence[CertRecord],
    current: dict[str, CertRecord | None],
    expected: Mapping[str, int],
) -> None:
    for record in fresh:
        if record.name not in expected:
            continue
        existing = current.get(record.name)
        now = existing.generation if existing is not None else 0
        if now != expected[record.name]:
            raise GenerationMismatch(
                f"{record.name} is at generation {now}, not {expected[record.name]} as "
                "expected: it changed since it was read; read it again and decide"
            )


def _names(records: Sequence[CertRecord]) -> str:
    return ", ".join(f"{r.name}@{r.generation}" for r in records)
