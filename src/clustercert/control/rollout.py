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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clustercert.clock import iso, utc_now
from clustercert.control.agents import AgentPool
from clustercert.control.audit import CertificateEvent
from clustercert.control.state import (
    ROLLOUT_KEY,
    AppliedRecord,
    CertRecord,
    ClusterState,
    NodeRecord,
    RolloutRecord,
)
from clustercert.errors import (
    AgentUnavailable,
    ConfigError,
    NodesNotUpdated,
    StoreConflict,
    UpdateInProgress,
)
from clustercert.store import Put

__all__ = [
    "FAULT_ENV",
    "FAULT_STEPS",
    "LOCK_TTL",
    "ROLLOUT_LOCK",
    "Coordinator",
    "FaultPlan",
    "NodeOutcome",
    "Progress",
    "cluster_lock",
    "holder_is_gone",
    "lock_owner",
]

log = logging.getLogger("clustercert.rollout")

ROLLOUT_LOCK = "rollout"
LOCK_TTL = 30.0

Seam = Callable[[str, str], Awaitable[None]]  # (step, the node it happened on or "")


# --- the cluster lock -----------------------------------------------------------------------
# A lease in the store (LOCK_TTL, refreshed while held). Its owner string names the process
# that holds it, so that a control plane restarted on the same host can see that the holder is
# a previous incarnation that died (kill -9, OOM, power) and take the lock over at once instead
# of waiting for the lease to run out. See docs/decisions.md ("Taking over the cluster lock").


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8] or "-"
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None when no
    such process runs. A zombie counts as gone. "-" where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "-"
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may contain spaces
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else "-"


_HOST = socket.gethostname().replace(":", "_") or "localhost"
_BOOT = _boot_id()


def lock_owner(role: str) -> str:
    """A unique owner string for one hold of the cluster lock by this process:
    ``HOST:BOOT:PID:START:ROLE-RANDOM`` (START: the process's start time in ticks, which tells
    a reused pid from the original)."""
    pid = os.getpid()
    return f"{_HOST}:{_BOOT}:{pid}:{_start_ticks(pid) or '-'}:{role}-{secrets.token_hex(4)}"


def holder_is_gone(holder: str) -> bool:
    """True only when ``holder`` (a :func:`lock_owner` string) provably no longer runs: it was
    a process of this host that is gone, or of an earlier boot of this host. Anything else
    (another host, an unknown format, a live process) is presumed alive: its lease expires."""
    parts = holder.split(":")
    if len(parts) != 5 or parts[0] != _HOST or not parts[2].isdigit():
        return False
    boot, pid, started = parts[1], int(parts[2]), parts[3]
    if boot != _BOOT:
        return boot != "-" and _BOOT != "-"
    now = _start_ticks(pid)
    if now is None:
        return True
    return now != "-" and started != "-" and now != started  # the pid was reused


@contextlib.asynccontextmanager
async def cluster_lock(
    state: ClusterState,
    wait: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    *,
    role: str = "update",
) -> AsyncIterator[str]:
    """Hold the cluster-wide update lock; wait at most ``wait`` seconds, then 409.

    The lock is a lease refreshed while held, so a crashed holder releases it after LOCK_TTL;
    a holder that :func:`holder_is_gone` says is dead is taken over at once."""
    owner = lock_owner(role)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not state.store.try_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
        holder = state.store.lock_holder(ROLLOUT_LOCK)
        if holder is not None and holder_is_gone(holder):
            log.warning(
                "the cluster lock is held by %s, a control plane process of this host that no "
                "longer runs; taking it over",
                holder,
            )
            state.store.unlock(ROLLOUT_LOCK, holder)  # only if it still holds it: atomic
            if state.store.try_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
                break
        if loop.time() >= deadline:
            raise UpdateInProgress(
                f"another certificate update holds the cluster lock; waited {wait:g} s. "
                "Retry when it has finished."
            )
        await sleep(0.05)

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            if not state.store.refresh_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
                log.error("lost the cluster lock (%s): its lease ran out", owner)

    refresher = asyncio.create_task(keep_alive())
    try:
        yield owner
    finally:
        refresher.cancel()
        state.store.unlock(ROLLOUT_LOCK, owner)


# --- the test-only fault seam ---------------------------------------------------------------

FAULT_ENV = "CLUSTERCERT_FAULT"
FAULT_STEPS = ("after_validation", "during_stage", "after_decision", "during_commit",
               "before_response")  # fmt: skip


class FaultPlan:
    """TEST-ONLY fault injection at one step of an API rollout (docs/reliability.md).

    ``CLUSTERCERT_FAULT=<step>`` makes the control plane SIGKILL itself the first time a
    rollout reaches ``<step>``; ``CLUSTERCERT_FAULT=pause:<step>`` makes every rollout that
    reaches it create ``<marker_dir>/fault-paused-<step>`` (two lines: the control plane's pid
    and the node the step happened on, if any) and wait (at most ``pause_limit`` seconds) until
    that file is deleted, so a test can act on the nodes at that exact moment.
    Steps: after_validation (lock taken, nothing written), during_stage (the first node has
    staged), after_decision, during_commit (the first node has committed), before_response
    (everything done, lock released). The reconciler never reaches a seam.
    """

    def __init__(
        self, step: str, *, pause: bool, marker_dir: Path, pause_limit: float = 120.0
    ) -> None:
        if step not in FAULT_STEPS:
            raise ConfigError(
                f"{FAULT_ENV}: unknown step {step!r}; expected one of {', '.join(FAULT_STEPS)}, "
                "optionally prefixed with 'pause:'"
            )
        self.step = step
        self.pause = pause
        self.marker = marker_dir / f"fault-paused-{step}"
        self.pause_limit = pause_limit

    @classmethod
    def parse(cls, spec: str, marker_dir: Path) -> FaultPlan:
        pause, _, step = spec.strip().rpartition(":")
        if pause not in ("", "pause"):
            raise ConfigError(f"{FAULT_ENV}: expected STEP or pause:STEP, got {spec!r}")
        return cls(step, pause=pause == "pause", marker_dir=marker_dir)

    def describe(self) -> str:
        return f"{'pause' if self.pause else 'SIGKILL'} at {self.step}"

    async def reached(self, step: str, node: str = "") -> None:
        if step != self.step:
            return
        if not self.pause:
            log.critical("TEST-ONLY fault injection: SIGKILL at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"{os.getpid()}\n{node}\n")
        log.warning(
            "TEST-ONLY fault injection: paused at %s until %s is deleted", step, self.marker
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pause_limit
        while self.marker.exists() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.marker.unlink(missing_ok=True)


# --- outcomes -------------------------------------------------------------------------------


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


@dataclass
class Progress:
    """How far the rollout this control plane is running has come on each node, for
    ``GET /v1/cluster/certificates/rollout`` (and the CLI's live view). In memory only: it
    describes work in flight, not state; the store keeps the decision."""

    names: list[str]
    nodes: dict[
        str, str
    ]  # node name -> waiting | staging | staged | committing | verified | failed
    phase: str = "staging"

    def as_json(self) -> dict[str, Any]:
        return {"in_progress": True, "names": self.names, "phase": self.phase,
                "nodes": dict(self.nodes)}  # fmt: skip


async def _no_seam(step: str, node: str = "") -> None:
    return None


class Coordinator:
    """Runs rollouts of validated certificate records to every node."""

    def __init__(
        self,
        state: ClusterState,
        pool: AgentPool,
        *,
        lock_wait: float = 30.0,
        clock: Callable[[], dt.datetime] = utc_now,
        on_committed: Callable[[Sequence[CertRecord]], None] = lambda records: None,
        fault: FaultPlan | None = None,
    ) -> None:
        self.state = state
        self.pool = pool
        self.lock_wait = lock_wait
        self.clock = clock
        self.on_committed = on_committed
        self.fault = fault
        self.progress: Progress | None = None

    def _mark(self, node: NodeRecord, state: str) -> None:
        if self.progress is not None and node.name in self.progress.nodes:
            self.progress.nodes[node.name] = state

    def _seam(self) -> Seam:
        """One rollout's fault seam: each step fires at most once per rollout."""
        fault = self.fault
        if fault is None:
            return _no_seam
        fired: set[str] = set()

        async def seam(step: str, node: str = "") -> None:
            if step not in fired:
                fired.add(step)
                await fault.reached(step, node)

        return seam

    def _applied_ok(self, node: NodeRecord, record: CertRecord) -> bool:
        applied = self.state.applied(node.node_id).get(record.name)
        return applied is not None and applied.ok and applied.generation == record.generation

    # --- the API's entry points -----------------------------------------------------------

    async def roll_out(self, proposed: Sequence[CertRecord], actor: str) -> list[NodeOutcome]:
        """Make ``proposed`` (generation ignored) the certificates of every node.

        Returns each node's outcome when every node serves them; raises NodesNotUpdated (409)
        when some node did not stage (nothing changed) or did not commit (the reconciler goes
        on), UpdateInProgress (409) when the lock stays busy. Idempotent: proposing what the
        store already desires creates no new generation; it succeeds at once when every node
        proved it, and otherwise pushes it to the nodes that lag (a retry after a 409).
        """
        seam = self._seam()
        async with cluster_lock(self.state, self.lock_wait) as owner:
            await self.resolve_in_flight()
            await seam("after_validation", "")
            nodes = self.state.nodes()
            used = self.state.generations_used()
            fresh: list[CertRecord] = []
            resumed: list[CertRecord] = []
            current: dict[str, CertRecord | None] = {}
            for item in proposed:
                existing = self.state.certificate(item.name)
                current[item.name] = existing
                if (
                    existing is not None
                    and existing.fingerprint == item.fingerprint
                    and existing.key == item.key
                    and existing.certificate == item.certificate
                ):
                    resumed.append(existing)  # a retry: already desired
                    continue
                # Above every generation ever staged, not only the desired one: an aborted
                # rollout's number is never reused (see ClusterState.generations_used).
                generation = max(existing.generation if existing else 0, used.get(item.name, 0)) + 1
                fresh.append(
                    replace(
                        item, generation=generation, revision=existing.revision if existing else 0
                    )
                )
            rolling = [r.name for r in proposed]
            self.progress = Progress(rolling, {n.name: "waiting" for n in nodes})
            try:
                if fresh:
                    outcomes = await self._run(fresh, resumed, current, nodes, actor, owner, seam)
                else:
                    outcomes = await self._resume(resumed, nodes, actor)
            finally:
                self.progress = None
        await seam("before_response", "")
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
            await self.resolve_in_flight()
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
                nodes=[o.as_json() for o in outcomes],
            )
        return list(outcomes)

    async def push(self, node: NodeRecord, records: Sequence[CertRecord]) -> NodeOutcome:
        """Stage and commit ``records`` on one node (the reconciler and roll-forward use it)."""
        staged = await self._stage_node(node, records, _no_seam)
        if not staged.ok:
            return staged
        return await self._commit_node(node, records, _no_seam)

    # --- the protocol ---------------------------------------------------------------------

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
        in_flight = self._begin(fresh, current, actor, owner)
        staged = await asyncio.gather(*(self._stage_node(n, records, seam) for n in nodes))
        failed = [o for o in staged if not o.ok]
        if failed:
            await self._abort_everywhere(in_flight, nodes)
            self.state.end_rollout(in_flight)
            for outcome in staged:
                if outcome.ok:
                    outcome.ok, outcome.error = False, "aborted: another node failed to stage"
            names = ", ".join(o.node.name for o in failed)
            raise NodesNotUpdated(
                f"{len(failed)} of {len(nodes)} nodes could not stage the certificate ({names}); "
                "the update was aborted and no node changed",
                nodes=[o.as_json() for o in staged],
            )
        try:
            decided = self._decide(fresh, actor, in_flight)
        except UpdateInProgress:
            await self._abort_everywhere(in_flight, nodes)
            with contextlib.suppress(StoreConflict):
                self.state.end_rollout(in_flight)
            raise
        log.info("rollout %s decided: %s", decided.rollout_id, _names(fresh))
        if self.progress is not None:
            self.progress.phase = "committing"
        await seam("after_decision", "")
        applied: list[tuple[int, str, AppliedRecord]] = []
        outcomes = list(
            await asyncio.gather(*(self._commit_node(n, records, seam, applied) for n in nodes))
        )
        self.state.record_applied_many(applied)
        self.on_committed(records)
        self._audit(fresh, current, actor, outcomes)
        self.state.end_rollout(decided)
        return outcomes

    async def _resume(
        self, records: Sequence[CertRecord], nodes: Sequence[NodeRecord], actor: str
    ) -> list[NodeOutcome]:
        """A retry of what the store already desires: push it to the nodes that have not
        proved it; a no-op when none lags."""

        async def finish(node: NodeRecord) -> NodeOutcome:
            lagging = [r for r in records if not self._applied_ok(node, r)]
            if not lagging:
                return NodeOutcome(node, results=self._applied_results(node, records))
            return await self.push(node, lagging)

        lagging_anywhere = any(not self._applied_ok(n, r) for n in nodes for r in records)
        outcomes = list(await asyncio.gather(*(finish(n) for n in nodes)))
        if lagging_anywhere:
            self.on_committed(records)
            self._audit(records, {}, actor, outcomes, action="retry")
        return outcomes

    def _begin(
        self,
        fresh: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        owner: str,
    ) -> RolloutRecord:
        record = RolloutRecord(
            rollout_id=secrets.token_hex(6),
            phase="staging",
            generations={r.name: r.generation for r in fresh},
            fingerprints={r.name: r.fingerprint for r in fresh},
            previous={
                r.name: (c.fingerprint if (c := current.get(r.name)) else None) for r in fresh
            },
            actor=actor,
            owner=owner,
            started_at=iso(self.clock()),
        )
        try:
            return self.state.begin_rollout(record)
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"another rollout is recorded in flight ({exc.description}); retry"
            ) from exc

    def _decide(
        self, records: Sequence[CertRecord], actor: str, in_flight: RolloutRecord
    ) -> RolloutRecord:
        """The decision: ONE atomic store commit makes every new generation desired and marks
        the rollout ``decided``. Before it, a crash means abort; after it, roll forward."""
        now = iso(self.clock())
        decided = replace(in_flight, phase="decided")
        ops = [
            Put(
                "certs/" + r.name,
                self.state.encode_cert(replace(r, updated_at=now, updated_by=actor)),
                expect_revision=r.revision,
            )
            for r in records
        ]
        ops.append(
            Put(
                ROLLOUT_KEY,
                self.state.encode_rollout(decided),
                expect_revision=in_flight.revision,
            )
        )
        try:
            revision = self.state.store.commit(ops)
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"the certificate changed while this update was staged ({exc.description}); retry"
            ) from exc
        return replace(decided, revision=revision)

    async def resolve_in_flight(self) -> None:
        """Finish the rollout a control plane left in flight (it died, or failed half-way):
        abort an undecided one on every node, roll a decided one forward to every node that
        has not proved it, write its audit event, forget it. Call with the cluster lock held.
        Nodes that do not answer are left to the reconciler (undecided files: ``_tidy``)."""
        record = self.state.rollout_in_flight()
        if record is None:
            return
        nodes = self.state.nodes()
        what = ", ".join(f"{n}@{g}" for n, g in sorted(record.generations.items()))
        if record.phase != "decided":
            log.warning(
                "rollout %s of %s (by %s at %s, lock owner %s) stopped before its decision: "
                "aborting it on every node",
                record.rollout_id, what, record.actor, record.started_at, record.owner,
            )  # fmt: skip
            outcomes = await self._abort_everywhere(record, nodes)
            action = "abort"
        else:
            log.warning(
                "rollout %s of %s (by %s at %s, lock owner %s) was decided but not finished: "
                "rolling it forward",
                record.rollout_id, what, record.actor, record.started_at, record.owner,
            )  # fmt: skip
            desired = {r.name: r for r in self.state.certificates()}
            rs = [
                desired[name]
                for name, generation in sorted(record.generations.items())
                if name in desired and desired[name].generation == generation
            ]
            outcomes = list(await asyncio.gather(*(self._roll_forward(n, rs) for n in nodes)))
            if rs:
                self.on_committed(rs)
            action = "update"
        for name, generation in sorted(record.generations.items()):
            new = record.fingerprints.get(name) if action == "update" else None
            self.state.add_event(
                CertificateEvent(
                    self.clock(),
                    record.actor,
                    action,
                    name=name,
                    generation=generation,
                    old_fingerprint=record.previous.get(name),
                    new_fingerprint=new,
                    nodes=[o.summary() for o in outcomes],
                    rollout_id=record.rollout_id,
                )
            )
        lagging = [o.node.name for o in outcomes if not o.ok]
        log.info(
            "rollout %s %s%s",
            record.rollout_id,
            "aborted" if action == "abort" else "rolled forward",
            f"; the reconciler goes on with {', '.join(lagging)}" if lagging else " everywhere",
        )
        self.state.end_rollout(record)

    async def _roll_forward(self, node: NodeRecord, records: Sequence[CertRecord]) -> NodeOutcome:
        lagging = [r for r in records if not self._applied_ok(node, r)]
        if not lagging:
            return NodeOutcome(node, results=self._applied_results(node, records))
        return await self.push(node, lagging)

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

    async def _abort_everywhere(
        self, in_flight: RolloutRecord, nodes: Sequence[NodeRecord]
    ) -> list[NodeOutcome]:
        return list(
            await asyncio.gather(*(self._abort_node(n, in_flight.generations) for n in nodes))
        )

    async def _commit_node(
        self,
        node: NodeRecord,
        records: Sequence[CertRecord],
        seam: Seam,
        applied: list[tuple[int, str, AppliedRecord]] | None = None,
    ) -> NodeOutcome:
        """Commit on one node. What it proved is recorded at once, or appended to ``applied``
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
            ok = bool(answer.get("ok")) and answer.get("fingerprint") == record.fingerprint
            assert outcome.results is not None
            outcome.results.append(answer)
            proof = AppliedRecord(
                generation=record.generation,
                fingerprint=str(answer.get("fingerprint")),
                ok=ok,
                services=list(answer.get("services", [])),
                at=iso(self.clock()),
            )
            if applied is None:
                self.state.record_applied(node.node_id, record.name, proof)
            else:
                applied.append((node.node_id, record.name, proof))
            if not ok:
                proofs = [*answer.get("services", []), *answer.get("links", [])]
                errors = [s["error"] for s in proofs if s.get("error")]
                outcome.ok = False
                outcome.error = "; ".join(errors) or f"{record.name} was not verified"
        self._mark(node, "verified" if outcome.ok else "failed")
        if outcome.ok:
            await seam("during_commit", node.name)
        return outcome

    def _audit(
        self,
        records: Sequence[CertRecord],
        current: dict[str, CertRecord | None],
        actor: str,
        outcomes: Sequence[NodeOutcome],
        action: str = "update",
    ) -> None:
        for record in records:
            old = current.get(record.name)
            self.state.add_event(
                CertificateEvent(
                    self.clock(),
                    actor,
                    action,
                    name=record.name,
                    generation=record.generation,
                    old_fingerprint=old.fingerprint if old else None,
                    new_fingerprint=record.fingerprint,
                    nodes=[o.summary() for o in outcomes],
                )
            )


def _names(records: Sequence[CertRecord]) -> str:
    return ", ".join(f"{r.name}@{r.generation}" for r in records)
