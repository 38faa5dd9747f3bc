"""The coordinator's two-phase protocol (src/clustercert/control/rollout.py), in-process.

The agents here are FAKES: :class:`FakeAgent` stands in for a remote agent process behind the
``Agents`` protocol (it keeps staged and current generations in memory and can be told to
refuse a stage or a commit), so the protocol's decisions can be checked in milliseconds against
a real store (SQLite through ``open_store``, keys sealed with ``KeySealer``). The real-process
suites, control/test_recovery.py and control/test_rollout_faults.py, cover the same protocol
for real: control plane, agents and redis-server processes over mutual TLS, killed at every
step.
"""

from __future__ import annotations

import asyncio
from asyncio import run
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from certfactory import CA
from cryptography import x509
from inprocess import state_with_nodes

from clustercert.control.agents import NodeAgent
from clustercert.control.rollout import Coordinator
from clustercert.control.state import CertRecord, ClusterState, NodeRecord, RolloutRecord
from clustercert.errors import AgentUnavailable, NodesNotUpdated
from clustercert.internode import CommitAnswer, ServiceProof, StatusAnswer
from clustercert.pki import fingerprint_sha256

ACTOR = "admin@cluster.local"
NODES = ("node-1", "node-2", "node-3")


@dataclass
class FakeAgent:
    """One node's agent, in memory: ``calls`` records every internode call in order."""

    name: str
    refuse_stage: bool = False
    refuse_commit: bool = False  # and refuse remove
    frozen: bool = False  # stage times out (as the real client reports it); abort never returns
    staged: dict[tuple[str, int], str] = field(default_factory=dict)  # -> certificate PEM
    current: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def status(self, probe: bool = False) -> StatusAnswer:
        raise NotImplementedError("the coordinator never asks for a status")

    async def stage(self, name: str, generation: int, certificate: str, key: str | None) -> None:
        self.calls.append(("stage", name, generation))
        if self.refuse_stage:
            raise AgentUnavailable(f"{self.name} refused stage of {name}: disk full")
        if self.frozen:
            raise AgentUnavailable(f"{self.name} did not answer stage of {name} within 1 s")
        self.staged[(name, generation)] = certificate

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        self.calls.append(("commit", name, generation))
        if self.refuse_commit:
            raise AgentUnavailable(f"{self.name} did not answer commit of {name} within 1 s")
        self.current[name] = generation
        leaf = x509.load_pem_x509_certificates(self.staged[(name, generation)].encode())[0]
        served = fingerprint_sha256(leaf)
        proof = ServiceProof("redis", name, True, served, None)
        return CommitAnswer(name, generation, served, True, (proof,))

    async def abort(self, name: str, generation: int) -> None:
        self.calls.append(("abort", name, generation))
        if self.frozen:
            await asyncio.Event().wait()  # like a node that stopped answering: forever
        self.staged.pop((name, generation), None)

    async def remove(self, name: str) -> None:
        self.calls.append(("remove", name, 0))
        if self.refuse_commit:
            raise AgentUnavailable(f"{self.name} did not answer remove of {name} within 1 s")


class FakeAgents:
    """The ``Agents`` protocol over :class:`FakeAgent`s, by node name."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.by_name = {name: FakeAgent(name) for name in names}

    async def client(self, node: NodeRecord) -> NodeAgent:
        return self.by_name[node.name]

    def calls(self) -> dict[str, list[tuple[str, str, int]]]:
        return {name: agent.calls for name, agent in self.by_name.items()}

    def forget_calls(self) -> None:
        for agent in self.by_name.values():
            agent.calls = []


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ClusterState]:
    with state_with_nodes(tmp_path, NODES) as cluster:
        yield cluster


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents(NODES)


def _proposal(common_name: str = "proxy.cluster.local") -> CertRecord:
    """A validated ``proxy`` record as the API hands it over (generation not yet chosen)."""
    leaf = CA.new().issue(common_name)
    return CertRecord(
        name="proxy",
        generation=0,
        certificate=leaf.full_chain_pem,
        key=leaf.key_pem,
        fingerprint=leaf.fingerprint,
        not_after="2030-01-01T00:00:00Z",
        source="user",
        updated_at="",
        updated_by="",
    )


def _roll_out(state: ClusterState, agents: FakeAgents, record: CertRecord) -> list[dict[str, Any]]:
    outcomes = asyncio.run(Coordinator(state, agents).roll_out([record], ACTOR))
    return [o.as_json() for o in outcomes]


def test_every_node_stages_then_every_node_commits(state: ClusterState, agents: FakeAgents) -> None:
    proposed = _proposal()
    nodes = _roll_out(state, agents, proposed)

    desired = run(state.certificate("proxy"))
    assert desired is not None
    assert (desired.generation, desired.fingerprint, desired.updated_by) == (
        1,
        proposed.fingerprint,
        ACTOR,
    )
    assert desired.key == proposed.key  # sealed in the store, opened again
    for agent_calls in agents.calls().values():
        assert agent_calls == [("stage", "proxy", 1), ("commit", "proxy", 1)]
    assert [n["name"] for n in nodes] == list(NODES)
    for node in nodes:
        assert (node["ok"], node["step"], node["error"]) == (True, "commit", None)
        assert node["served_fingerprint"] == proposed.fingerprint
        [entry] = node["certificates"]
        assert (entry["name"], entry["generation"], entry["ok"]) == ("proxy", 1, True)
        assert entry["services"][0]["served_fingerprint"] == proposed.fingerprint
    for record in run(state.nodes()):
        proof = run(state.applied(record.node_id))["proxy"]
        assert (proof.generation, proof.ok, proof.fingerprint) == (1, True, proposed.fingerprint)
    assert run(state.rollout_in_flight()) is None
    [event] = run(state.events())
    assert (event["action"], event["generation"], event["new_fingerprint"]) == (
        "update",
        1,
        proposed.fingerprint,
    )


def test_one_node_fails_to_stage_so_the_others_abort_and_nothing_changes(
    state: ClusterState, agents: FakeAgents
) -> None:
    _roll_out(state, agents, first := _proposal("first.cluster.local"))
    before = run(state.certificate("proxy"))
    applied_before = {n.node_id: run(state.applied(n.node_id)) for n in run(state.nodes())}
    agents.forget_calls()
    agents.by_name["node-2"].refuse_stage = True

    with pytest.raises(NodesNotUpdated, match=r"1 of 3 nodes could not stage") as info:
        _roll_out(state, agents, _proposal("second.cluster.local"))

    assert info.value.http_status == 409
    body = info.value.to_body()
    assert body["error_code"] == "nodes_not_updated"
    assert (body["step"], body["changed"]) == ("stage", False)
    assert "the update was aborted and no node changed" in body["description"]
    by_name = {n["name"]: n for n in body["nodes"]}
    assert (by_name["node-2"]["ok"], by_name["node-2"]["step"]) == (False, "stage")
    assert "disk full" in by_name["node-2"]["error"]
    for name in ("node-1", "node-3"):
        assert by_name[name]["ok"] is False
        assert by_name[name]["error"] == "aborted: another node failed to stage"
    # Abort reached the nodes that staged, not the one that failed (the reconciler tidies it);
    # nothing was committed.
    calls = agents.calls()
    assert calls["node-2"] == [("stage", "proxy", 2)]
    for name in ("node-1", "node-3"):
        assert calls[name] == [("stage", "proxy", 2), ("abort", "proxy", 2)]
    # Nothing desired changed, nothing new was proved, nothing is left in flight.
    assert run(state.certificate("proxy")) == before
    assert before is not None and before.fingerprint == first.fingerprint
    assert {n.node_id: run(state.applied(n.node_id)) for n in run(state.nodes())} == applied_before
    assert run(state.rollout_in_flight()) is None
    assert run(state.generations_used()) == {"proxy": 2}  # the aborted number is never reused
    # The abort is audited, with each node's reason (newest event first).
    abort, update = run(state.events())
    assert (abort["action"], update["action"]) == ("abort", "update")
    assert (abort["name"], abort["generation"], abort["new_fingerprint"]) == ("proxy", 2, None)
    assert abort["old_fingerprint"] == first.fingerprint and "recovered" not in abort
    reasons = {n["name"]: (n["ok"], n["error"]) for n in abort["nodes"]}
    assert reasons["node-1"] == reasons["node-3"] == (True, None)
    assert reasons["node-2"][0] is False
    assert reasons["node-2"][1].startswith("not aborted: ") and "disk full" in reasons["node-2"][1]


def test_a_frozen_node_costs_the_stage_timeout_once_not_twice(
    state: ClusterState, agents: FakeAgents
) -> None:
    """The frozen node's stage times out; it is not sent an abort (which would wait out the
    same timeout again: here it would never return), so the 409 comes back at once."""
    agents.by_name["node-3"].frozen = True

    async def roll_out() -> None:
        await asyncio.wait_for(Coordinator(state, agents).roll_out([_proposal()], ACTOR), 10)

    with pytest.raises(NodesNotUpdated) as info:
        asyncio.run(roll_out())

    body = info.value.to_body()
    assert (body["step"], body["changed"]) == ("stage", False)
    assert "within 1 s" in {n["name"]: n for n in body["nodes"]}["node-3"]["error"]
    assert agents.calls()["node-3"] == [("stage", "proxy", 1)]
    assert run(state.certificate("proxy")) is None
    assert run(state.rollout_in_flight()) is None
    [abort] = run(state.events())
    assert abort["action"] == "abort"
    assert [n["ok"] for n in abort["nodes"]] == [True, True, False]


def test_one_node_fails_to_commit_after_the_decision(
    state: ClusterState, agents: FakeAgents
) -> None:
    agents.by_name["node-3"].refuse_commit = True
    proposed = _proposal()

    with pytest.raises(NodesNotUpdated, match=r"1 of 3 nodes did not switch \(node-3\)") as info:
        _roll_out(state, agents, proposed)

    assert info.value.http_status == 409
    assert "recorded as desired" in info.value.description
    assert (info.value.to_body()["step"], info.value.to_body()["changed"]) == ("commit", True)
    by_name = {n["name"]: n for n in info.value.to_body()["nodes"]}
    assert (by_name["node-3"]["ok"], by_name["node-3"]["certificates"]) == (False, [])
    assert by_name["node-1"]["ok"] and by_name["node-2"]["ok"]
    # Decided: the store has the new generation, proved by the two nodes that committed.
    desired = run(state.certificate("proxy"))
    assert desired is not None and (desired.generation, desired.fingerprint) == (
        1,
        proposed.fingerprint,
    )
    proved = {n.name: run(state.applied(n.node_id)).get("proxy") for n in run(state.nodes())}
    assert proved["node-3"] is None
    assert all(p is not None and p.ok for n, p in proved.items() if n != "node-3")
    assert run(state.rollout_in_flight()) is None


def test_a_node_that_misses_a_removal_gets_a_409_that_says_the_store_changed(
    state: ClusterState, agents: FakeAgents
) -> None:
    _roll_out(state, agents, _proposal())
    agents.by_name["node-1"].refuse_commit = True
    record = run(state.certificate("proxy"))
    assert record is not None

    with pytest.raises(NodesNotUpdated) as info:
        asyncio.run(Coordinator(state, agents).remove(record, ACTOR))

    body = info.value.to_body()
    assert (body["error_code"], body["step"], body["changed"]) == (
        "nodes_not_updated",
        "remove",
        True,
    )
    assert [n["ok"] for n in body["nodes"]] == [False, True, True]
    assert run(state.certificate("proxy")) is None


def test_a_retry_pushes_only_to_the_lagging_node_and_then_is_a_no_op(
    state: ClusterState, agents: FakeAgents
) -> None:
    agents.by_name["node-3"].refuse_commit = True
    proposed = _proposal()
    with pytest.raises(NodesNotUpdated):
        _roll_out(state, agents, proposed)
    agents.by_name["node-3"].refuse_commit = False
    agents.forget_calls()

    nodes = _roll_out(state, agents, proposed)  # the same certificate again

    assert agents.calls() == {
        "node-1": [],
        "node-2": [],
        "node-3": [("stage", "proxy", 1), ("commit", "proxy", 1)],
    }
    assert all(n["ok"] for n in nodes)
    # The nodes that had proved it report what they proved, like the one that just did.
    assert all(n["certificates"][0]["generation"] == 1 for n in nodes)
    desired = run(state.certificate("proxy"))
    assert desired is not None and desired.generation == 1  # no new generation
    assert [e["action"] for e in run(state.events())] == ["retry", "update"]

    agents.forget_calls()
    again = _roll_out(state, agents, proposed)
    assert agents.calls() == {name: [] for name in NODES}
    assert again == nodes
    assert len(run(state.events())) == 2  # nothing happened, nothing is audited


def _in_flight(state: ClusterState, phase: str, generation: int) -> RolloutRecord:
    return run(
        state.begin_rollout(
            RolloutRecord(
                rollout_id="r1",
                phase=phase,
                generations={"proxy": generation},
                fingerprints={"proxy": "ab" * 32},
                previous={"proxy": None},
                actor=ACTOR,
                owner="other-host:abcd1234:1:1:update-00",
                started_at="2026-01-01T00:00:00Z",
            )
        )
    )


def test_resolve_in_flight_aborts_an_undecided_rollout(
    state: ClusterState, agents: FakeAgents
) -> None:
    _in_flight(state, "staging", 1)

    asyncio.run(Coordinator(state, agents).resolve_in_flight())

    assert agents.calls() == {name: [("abort", "proxy", 1)] for name in NODES}
    assert run(state.certificate("proxy")) is None
    assert run(state.rollout_in_flight()) is None
    [event] = run(state.events())
    assert (event["action"], event["rollout_id"], event["new_fingerprint"]) == ("abort", "r1", None)


def test_resolve_in_flight_rolls_a_decided_rollout_forward(
    state: ClusterState, agents: FakeAgents
) -> None:
    proposed = _proposal()
    # What a control plane that died right after its decision leaves: generation 1 desired,
    # the record decided, and no node committed.
    run(state.put_certificate(replace(proposed, generation=1)))
    _in_flight(state, "decided", 1)

    asyncio.run(Coordinator(state, agents).resolve_in_flight())

    assert agents.calls() == {
        name: [("stage", "proxy", 1), ("commit", "proxy", 1)] for name in NODES
    }
    for node in run(state.nodes()):
        proof = run(state.applied(node.node_id))["proxy"]
        assert (proof.generation, proof.ok) == (1, True)
    assert run(state.rollout_in_flight()) is None
    [event] = run(state.events())
    assert (event["action"], event["rollout_id"]) == ("update", "r1")
