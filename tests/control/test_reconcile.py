"""The reconciler's scheduling in-process: which nodes a pass visits, which it only watches.

FAKE AGENTS: the agents here are in-memory fakes of the ``Agents`` protocol, to test the
scheduling logic alone (fast, with exact call counts); a real SQLite store holds the state. The
same behaviour with real processes and real TLS is tests/test_node_status.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from asyncio import run
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from certfactory import CA
from inprocess import state_with_nodes

from clustercert.clock import iso
from clustercert.control.agents import NodeAgent
from clustercert.control.reconcile import Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.state import AppliedRecord, CertRecord, ClusterState, NodeRecord
from clustercert.errors import AgentUnavailable
from clustercert.internode import (
    CertificateStatus,
    CommitAnswer,
    ServiceProof,
    StatusAnswer,
)

NODES = ("node-1", "node-2", "node-3")


@dataclass
class WatchedAgent:
    """One node's agent in memory; a watch waits until the test releases it."""

    node_id: int
    name: str
    boot_id: str = "boot-1"
    held: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> generation, fp
    staged: dict[tuple[str, int], str] = field(default_factory=dict)  # -> fingerprint
    calls: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    fail_watch: bool = False

    def _status(self) -> StatusAnswer:
        certificates = {n: CertificateStatus(g, fp, ()) for n, (g, fp) in self.held.items()}
        return StatusAnswer(self.node_id, self.name, certificates, None, boot_id=self.boot_id)

    async def status(self, probe: bool = False) -> StatusAnswer:
        self.calls.append("status")
        return self._status()

    async def watch(self, boot_id: str | None, wait: float) -> StatusAnswer:
        self.calls.append("watch")
        if boot_id == self.boot_id:
            await self.release.wait()
            self.release.clear()
        if self.fail_watch:
            raise AgentUnavailable(f"{self.name} unreachable during watch: connection reset")
        return self._status()

    async def stage(self, name: str, generation: int, certificate: str, key: str | None) -> None:
        self.calls.append("stage")
        self.staged[(name, generation)] = CERTS[certificate]

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        self.calls.append("commit")
        fingerprint = self.staged[(name, generation)]
        self.held[name] = (generation, fingerprint)
        proof = ServiceProof("redis", name, True, fingerprint)
        return CommitAnswer(name, generation, fingerprint, True, (proof,))

    async def abort(self, name: str, generation: int) -> None:
        self.calls.append("abort")

    async def remove(self, name: str) -> None:
        self.calls.append("remove")


class WatchedAgents:
    def __init__(self, nodes: list[NodeRecord]) -> None:
        self.by_name = {n.name: WatchedAgent(n.node_id, n.name) for n in nodes}

    async def client(self, node: NodeRecord) -> NodeAgent:
        return self.by_name[node.name]

    def forget_calls(self) -> None:
        for agent in self.by_name.values():
            agent.calls = []


CERTS: dict[str, str] = {}  # certificate PEM -> fingerprint, for the fake commit


def _record(generation: int) -> CertRecord:
    leaf = CA.new().issue("proxy.cluster.local")
    CERTS[leaf.cert_pem] = leaf.fingerprint
    return CertRecord(
        name="proxy",
        generation=generation,
        certificate=leaf.cert_pem,
        key=leaf.key_pem,
        fingerprint=leaf.fingerprint,
        not_after="2030-01-01T00:00:00Z",
        source="user",
        updated_at=iso(dt.datetime.now(dt.UTC)),
        updated_by="test",
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ClusterState]:
    with state_with_nodes(tmp_path, NODES) as cluster:
        run(cluster.put_certificate(_record(1)))
        yield cluster


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _calls(agents: WatchedAgents) -> dict[str, list[str]]:
    return {name: agent.calls for name, agent in agents.by_name.items()}


def test_nodes_in_sync_are_watched_not_polled(state: ClusterState) -> None:
    async def scenario() -> None:
        agents = WatchedAgents(await state.nodes())
        reconciler = Reconciler(Coordinator(state, agents), interval=0.01)
        assert await reconciler.run_once() is True  # the first pass visits every node
        await _settle()
        assert _calls(agents) == {n: ["status", "stage", "commit", "watch"] for n in NODES}
        assert reconciler.known_in_sync() == {1, 2, 3}
        agents.forget_calls()
        for _ in range(20):  # nothing changed: no call to any node, no lock taken
            assert await reconciler.run_once() is True
        await _settle()
        assert _calls(agents) == {n: [] for n in NODES}
        assert state.store.lock_holder("rollout") is None
        await reconciler.stop_watching()

    asyncio.run(scenario())


def test_a_restart_a_lost_watch_or_a_failed_call_gets_the_node_visited(
    state: ClusterState,
) -> None:
    async def scenario() -> None:
        agents = WatchedAgents(await state.nodes())
        reconciler = Reconciler(Coordinator(state, agents), interval=0.01)
        await reconciler.run_once()
        await _settle()
        agents.forget_calls()

        restarted = agents.by_name["node-1"]
        restarted.boot_id = "boot-2"  # a new incarnation answers the watch at once
        restarted.release.set()
        lost = agents.by_name["node-2"]
        lost.fail_watch = True  # the connection dropped
        lost.release.set()
        await _settle()
        assert reconciler.known_in_sync() == {3}
        reconciler.suspect(3)  # e.g. a rollout's call to it failed
        assert reconciler.known_in_sync() == set()

        lost.fail_watch = False
        assert await reconciler.run_once() is True
        await _settle()
        # One status each (they hold the desired state already), then watched again; the
        # watches that ended were already open before the calls were forgotten.
        assert _calls(agents) == {n: ["status", "watch"] for n in NODES}
        await reconciler.stop_watching()

    asyncio.run(scenario())


def test_a_new_desired_generation_revisits_only_the_nodes_without_its_proof(
    state: ClusterState,
) -> None:
    async def scenario() -> None:
        agents = WatchedAgents(await state.nodes())
        reconciler = Reconciler(Coordinator(state, agents), interval=0.01)
        await reconciler.run_once()
        await _settle()
        agents.forget_calls()
        # What a rollout leaves: generation 2 desired, proved by node-1 and node-2 only.
        current = await state.certificate("proxy")
        assert current is not None
        new = replace(_record(2), revision=current.revision)
        await state.put_certificate(new)
        for agent in (agents.by_name["node-1"], agents.by_name["node-2"]):
            agent.held["proxy"] = (2, new.fingerprint)
            proof = AppliedRecord(2, new.fingerprint, True, [], iso(dt.datetime.now(dt.UTC)))
            await state.record_applied(agent.node_id, "proxy", proof)

        assert await reconciler.run_once() is True
        await _settle()
        assert _calls(agents) == {
            "node-1": [],
            "node-2": [],
            "node-3": ["status", "stage", "commit", "watch"],
        }
        assert agents.by_name["node-3"].held["proxy"] == (2, new.fingerprint)
        await reconciler.stop_watching()

    asyncio.run(scenario())
