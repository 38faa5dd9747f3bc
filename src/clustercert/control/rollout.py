"""The two-phase rollout of DESIGN §6: lock, stage everywhere, decide, commit everywhere, verify.

Nothing reaches a node before validation passed (the caller hands over validated records). If
any node fails to stage, every node aborts and nothing changed anywhere. Once every node has
staged, the new generations are recorded as desired in one atomic store commit: from there the
change rolls forward, and nodes that fail to commit are left to the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from clustercert.control.agents import AgentPool
from clustercert.control.state import AppliedRecord, CertRecord, ClusterState, NodeRecord
from clustercert.errors import AgentUnavailable, NodesNotUpdated, StoreConflict, UpdateInProgress
from clustercert.store import Put

__all__ = ["ROLLOUT_LOCK", "Coordinator", "NodeOutcome", "cluster_lock"]

log = logging.getLogger("clustercert.rollout")

ROLLOUT_LOCK = "rollout"
LOCK_TTL = 30.0


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.asynccontextmanager
async def cluster_lock(
    state: ClusterState, wait: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> AsyncIterator[str]:
    """Hold the cluster-wide update lock; wait at most ``wait`` seconds, then 409.

    The lock is a lease refreshed while held, so a crashed holder releases it after LOCK_TTL."""
    owner = secrets.token_hex(8)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not state.store.try_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
        if loop.time() >= deadline:
            raise UpdateInProgress(
                f"another certificate update holds the cluster lock; waited {wait:g} s. "
                "Retry when it has finished."
            )
        await sleep(0.05)

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            state.store.refresh_lock(ROLLOUT_LOCK, owner, LOCK_TTL)

    refresher = asyncio.create_task(keep_alive())
    try:
        yield owner
    finally:
        refresher.cancel()
        state.store.unlock(ROLLOUT_LOCK, owner)


@dataclass
class NodeOutcome:
    """One node's result in a rollout, as the API reports it."""

    node: NodeRecord
    ok: bool = True
    step: str = "commit"
    error: str | None = None
    results: list[dict[str, Any]] | None = None

    def summary(self) -> dict[str, Any]:
        """The short form kept in audit events."""
        return {"node_id": self.node.node_id, "name": self.node.name, "ok": self.ok,
                "error": self.error}  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        served = [
            s["served_fingerprint"]
            for r in self.results or []
            for s in r.get("services", [])
            if s.get("served_fingerprint")
        ]
        return {
            "node_id": self.node.node_id,
            "name": self.node.name,
            "ok": self.ok,
            "step": self.step,
            "error": self.error,
            "served_fingerprint": served[0] if len(set(served)) == 1 else served or None,
            "certificates": self.results or [],
        }


class Coordinator:
    """Runs rollouts of validated certificate records to every node."""

    def __init__(
        self,
        state: ClusterState,
        pool: AgentPool,
        *,
        lock_wait: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_committed: Callable[[Sequence[CertRecord]], None] = lambda records: None,
    ) -> None:
        self.state = state
        self.pool = pool
        self.lock_wait = lock_wait
        self.clock = clock
        self.on_committed = on_committed

    def _is_applied_everywhere(self, record: CertRecord, nodes: Sequence[NodeRecord]) -> bool:
        for node in nodes:
            applied = self.state.applied(node.node_id).get(record.name)
            if applied is None or not applied.ok or applied.generation != record.generation:
                return False
        return True

    async def roll_out(self, proposed: Sequence[CertRecord], actor: str) -> list[NodeOutcome]:
        """Make ``proposed`` (generation ignored) the certificates of every node.

        Returns each node's outcome when every node serves them; raises NodesNotUpdated (409)
        when some node did not stage (nothing changed) or did not commit (the reconciler goes
        on), UpdateInProgress (409) when the lock stays busy. Idempotent: proposing what every
        node already serves changes nothing and succeeds.
        """
        async with cluster_lock(self.state, self.lock_wait):
            nodes = self.state.nodes()
            records: list[CertRecord] = []
            current: dict[str, CertRecord | None] = {}
            for item in proposed:
                existing = self.state.certificate(item.name)
                current[item.name] = existing
                same = (
                    existing is not None
                    and existing.fingerprint == item.fingerprint
                    and existing.key == item.key
                    and existing.certificate == item.certificate
                )
                if same and existing is not None and self._is_applied_everywhere(existing, nodes):
                    continue  # a retry of a request that already succeeded
                generation = existing.generation + 1 if existing else 1
                records.append(
                    replace(
                        item, generation=generation, revision=existing.revision if existing else 0
                    )
                )
            if not records:
                return [
                    NodeOutcome(node, results=self._applied_results(node, proposed))
                    for node in nodes
                ]
            await self._stage_everywhere(records, nodes)
            self._decide(records, current, actor)
            outcomes = await asyncio.gather(*(self._commit_node(node, records) for node in nodes))
            self.on_committed(records)
            self._audit(records, current, actor, outcomes)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            names = ", ".join(o.node.name for o in failed)
            raise NodesNotUpdated(
                f"{len(failed)} of {len(nodes)} nodes did not switch ({names}); the new "
                "certificate is recorded as desired and the reconciler keeps retrying them",
                nodes=[o.as_json() for o in outcomes],
            )
        return list(outcomes)

    async def remove(self, record: CertRecord, actor: str) -> list[NodeOutcome]:
        """Delete an optional certificate: from the store first (the decision), then from
        every node's disk. Nodes that cannot be reached now are cleaned by the reconciler;
        they are reported with NodesNotUpdated (409)."""
        async with cluster_lock(self.state, self.lock_wait):
            nodes = self.state.nodes()
            self.state.delete_certificate(record)

            async def remove_on(node: NodeRecord) -> NodeOutcome:
                client = await self.pool.client(node)
                try:
                    await client.remove(record.name)
                except AgentUnavailable as exc:
                    return NodeOutcome(node, ok=False, step="remove", error=exc.description)
                return NodeOutcome(node, step="remove")

            outcomes = await asyncio.gather(*(remove_on(n) for n in nodes))
            self.state.add_event(
                {
                    "at": _iso(self.clock()),
                    "who": actor,
                    "action": "delete",
                    "name": record.name,
                    "generation": record.generation,
                    "old_fingerprint": record.fingerprint,
                    "new_fingerprint": None,
                    "nodes": [o.summary() for o in outcomes],
                }
            )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise NodesNotUpdated(
                f"{record.name} was deleted from the store, but {len(failed)} of {len(nodes)} "
                "nodes still hold its files; the reconciler removes them when they answer",
                nodes=[o.as_json() for o in outcomes],
            )
        return list(outcomes)

    def _applied_results(
        self, node: NodeRecord, records: Sequence[CertRecord]
    ) -> list[dict[str, Any]]:
        applied = self.state.applied(node.node_id)
        results = []
        for record in records:
            entry = applied.get(record.name)
            if entry is not None:
                results.append(
                    {"name": record.name, "generation": entry.generation, "ok": entry.ok,
                     "fingerprint": entry.fingerprint, "services": entry.services}
                )  # fmt: skip
        return results

    async def _stage_node(self, node: NodeRecord, records: Sequence[CertRecord]) -> NodeOutcome:
        client = await self.pool.client(node)
        try:
            for record in records:
                await client.stage(record.name, record.generation, record.certificate, record.key)
        except AgentUnavailable as exc:
            return NodeOutcome(node, ok=False, step="stage", error=exc.description)
        return NodeOutcome(node, step="stage")

    async def _abort_node(self, node: NodeRecord, records: Sequence[CertRecord]) -> None:
        client = await self.pool.client(node)
        for record in records:
            try:
                await client.abort(record.name, record.generation)
            except AgentUnavailable as exc:
                # Staged files of an undecided generation are harmless: never current, and
                # overwritten by the next stage of that generation. Log and go on.
                log.warning("abort on %s: %s", node.name, exc.description)

    async def _stage_everywhere(
        self, records: Sequence[CertRecord], nodes: Sequence[NodeRecord]
    ) -> None:
        outcomes = await asyncio.gather(*(self._stage_node(n, records) for n in nodes))
        failed = [o for o in outcomes if not o.ok]
        if not failed:
            return
        await asyncio.gather(*(self._abort_node(n, records) for n in nodes))
        for outcome in outcomes:
            if outcome.ok:
                outcome.ok, outcome.error = False, "aborted: another node failed to stage"
        names = ", ".join(o.node.name for o in failed)
        raise NodesNotUpdated(
            f"{len(failed)} of {len(nodes)} nodes could not stage the certificate ({names}); "
            "the update was aborted and no node changed",
            nodes=[o.as_json() for o in outcomes],
        )

    def _decide(
        self, records: Sequence[CertRecord], current: dict[str, CertRecord | None], actor: str
    ) -> None:
        now = _iso(self.clock())
        ops = [
            Put(
                "certs/" + r.name,
                self.state.encode_cert(replace(r, updated_at=now, updated_by=actor)),
                expect_revision=r.revision,
            )
            for r in records
        ]
        try:
            self.state.store.commit(ops)
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"the certificate changed while this update was staged ({exc.description}); retry"
            ) from exc

    async def push(self, node: NodeRecord, records: Sequence[CertRecord]) -> NodeOutcome:
        """Stage and commit ``records`` on one node (used by the reconciler)."""
        staged = await self._stage_node(node, records)
        if not staged.ok:
            return staged
        return await self._commit_node(node, records)

    async def _commit_node(self, node: NodeRecord, records: Sequence[CertRecord]) -> NodeOutcome:
        client = await self.pool.client(node)
        outcome = NodeOutcome(node, results=[])
        for record in records:
            try:
                answer = await client.commit(record.name, record.generation)
            except AgentUnavailable as exc:
                outcome.ok, outcome.error = False, exc.description
                break
            ok = bool(answer.get("ok")) and answer.get("fingerprint") == record.fingerprint
            assert outcome.results is not None
            outcome.results.append(answer)
            self.state.record_applied(
                node.node_id,
                record.name,
                AppliedRecord(
                    generation=record.generation,
                    fingerprint=str(answer.get("fingerprint")),
                    ok=ok,
                    services=list(answer.get("services", [])),
                    at=_iso(self.clock()),
                ),
            )
            if not ok:
                errors = [s["error"] for s in answer.get("services", []) if s.get("error")]
                outcome.ok = False
                outcome.error = "; ".join(errors) or f"{record.name} was not verified"
        return outcome

    def _audit(
        self,
        records: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        outcomes: Sequence[NodeOutcome],
    ) -> None:
        for record in records:
            old = current.get(record.name)
            self.state.add_event(
                {
                    "at": _iso(self.clock()),
                    "who": actor,
                    "action": "update",
                    "name": record.name,
                    "generation": record.generation,
                    "old_fingerprint": old.fingerprint if old else None,
                    "new_fingerprint": record.fingerprint,
                    "nodes": [
                        {
                            "node_id": o.node.node_id,
                            "name": o.node.name,
                            "ok": o.ok,
                            "error": o.error,
                        }
                        for o in outcomes
                    ],
                }
            )
