"""The trust phases of a rollout (src/clustercert/control/trust.py), in-process.

The agents here are FAKES (:class:`TrustingAgent`: staged, committed and pinned roots in
memory; one can be told to refuse its trust call), so the order of the phases and what a
failure undoes can be checked in milliseconds against a real SQLite store. The real-process
proof is tests/test_trust_phases.py (agents, redis-servers, a control plane paused between
phases) and the after_trust step of tests/test_reliability.py (a control plane killed there).
"""

from __future__ import annotations

import asyncio
from asyncio import run
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from certfactory import CA
from cryptography import x509
from inprocess import state_with_nodes

from clustercert.control.agents import NodeAgent
from clustercert.control.rollout import Coordinator
from clustercert.control.state import CertRecord, ClusterState, NodeRecord, RolloutRecord
from clustercert.control.trust import TrustKeeper
from clustercert.errors import AgentUnavailable, NodesNotUpdated
from clustercert.internode import CommitAnswer, ServiceProof, StatusAnswer, TrustAnswer
from clustercert.pki import fingerprint_sha256
from clustercert.validation import TrustStore

ACTOR = "admin@cluster.local"
NODES = ("node-1", "node-2", "node-3")
INTERNAL = CA.new("internal CA")


@dataclass
class TrustingAgent:
    name: str
    refuse_trust: bool = False
    staged: dict[tuple[str, int], str] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    async def status(self, probe: bool = False) -> StatusAnswer:
        return StatusAnswer(0, self.name, {}, None, tuple(sorted(self.pinned)))

    async def stage(self, name: str, generation: int, certificate: str, key: str | None) -> None:
        self.calls.append("stage")
        self.staged[(name, generation)] = certificate

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        self.calls.append("commit")
        leaf = x509.load_pem_x509_certificates(self.staged[(name, generation)].encode())[0]
        served = fingerprint_sha256(leaf)
        return CommitAnswer(
            name, generation, served, True, (ServiceProof("redis", name, True, served),)
        )

    async def abort(self, name: str, generation: int) -> None:
        self.calls.append("abort")

    async def remove(self, name: str) -> None:
        self.calls.append("remove")

    async def trust(self, roots: Sequence[str]) -> TrustAnswer:
        fingerprints = {
            fingerprint_sha256(x509.load_pem_x509_certificate(r.encode())) for r in roots
        }
        self.calls.append(f"trust {len(fingerprints)}")
        if self.refuse_trust:
            raise AgentUnavailable(f"{self.name} refused trust: the trust bundle was refused")
        self.pinned = fingerprints
        return TrustAnswer(tuple(sorted(fingerprints)), {"redis": tuple(sorted(fingerprints))})


class TrustingAgents:
    def __init__(self) -> None:
        self.by_name = {name: TrustingAgent(name) for name in NODES}

    async def client(self, node: NodeRecord) -> NodeAgent:
        return self.by_name[node.name]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ClusterState]:
    with state_with_nodes(tmp_path, NODES) as cluster:
        yield cluster


def _coordinator(state: ClusterState, agents: TrustingAgents) -> Coordinator:
    keeper = TrustKeeper(state, agents, TrustStore.of([INTERNAL.cert]), [INTERNAL.cert])
    return Coordinator(state, agents, trust=keeper)


def _proposal(ca: CA) -> CertRecord:
    leaf = ca.issue("proxy.cluster.local")
    return CertRecord(
        name="proxy", generation=0, certificate=leaf.full_chain_pem, key=leaf.key_pem,
        fingerprint=leaf.fingerprint, not_after="2030-01-01T00:00:00Z", source="user",
        updated_at="", updated_by="",
    )  # fmt: skip


def _fp(ca: CA) -> str:
    return fingerprint_sha256(ca.cert)


def test_a_new_root_is_pinned_everywhere_before_anything_is_staged(state: ClusterState) -> None:
    agents = TrustingAgents()
    first, second = CA.new(), CA.new()
    asyncio.run(_coordinator(state, agents).roll_out([_proposal(first)], ACTOR))
    for agent in agents.by_name.values():
        assert agent.calls == ["trust 1", "stage", "commit"]  # phase a, then b; nothing to retire
        assert agent.pinned == {_fp(first)}
        agent.calls = []
    asyncio.run(_coordinator(state, agents).roll_out([_proposal(second)], ACTOR))
    for agent in agents.by_name.values():
        # a: both roots (the one in use stays until nobody uses it), b, then c retires `first`.
        assert agent.calls == ["trust 2", "stage", "commit", "trust 1"]
        assert agent.pinned == {_fp(second)}
    assert run(state.rollout_in_flight()) is None
    trust_events = [e for e in run(state.events()) if e["action"] in ("trust", "retire")]
    assert [(e["action"], e["roots"], e["who"]) for e in trust_events] == [
        ("retire", [_fp(first)], ACTOR),  # newest first
        ("trust", [_fp(second)], ACTOR),
        ("trust", [_fp(first)], ACTOR),
    ]
    assert all(n["ok"] for e in trust_events for n in e["nodes"])


@pytest.mark.parametrize(
    ("members", "together"),
    [
        ({"node-1": False, "node-2": False, "node-3": True}, {"node-1", "node-2"}),
        ({"node-1": False, "node-2": None, "node-3": None}, set()),  # never said: one at a time
    ],
)
def test_a_new_root_is_pinned_in_parallel_except_on_etcd_members(
    state: ClusterState, members: dict[str, bool | None], together: set[str]
) -> None:
    """Nodes that said they run no etcd member are pinned together; the others one at a time,
    never beside another pin (a member restarts to load the root; quorum allows one)."""
    agents = TrustingAgents()
    active: set[str] = set()
    seen_together: list[frozenset[str]] = []

    def slow(agent: TrustingAgent) -> None:
        pin = agent.trust

        async def trust(roots: Sequence[str]) -> TrustAnswer:
            active.add(agent.name)
            seen_together.append(frozenset(active))
            await asyncio.sleep(0.02)
            active.discard(agent.name)
            return await pin(roots)

        agent.trust = trust  # type: ignore[method-assign]

    for agent in agents.by_name.values():
        slow(agent)
    coordinator = _coordinator(state, agents)
    assert coordinator.trust is not None
    for node in run(state.nodes()):
        status = StatusAnswer(node.node_id, node.name, {}, None, etcd_member=members[node.name])
        coordinator.trust.learn(node.node_id, status)
    root = CA.new()
    asyncio.run(coordinator.roll_out([_proposal(root)], ACTOR))
    assert all(a.pinned == {_fp(root)} for a in agents.by_name.values())
    for name, member in members.items():
        if member is not False:  # pinned while no other node was
            assert all(s == {name} for s in seen_together if name in s)
    assert {n for s in seen_together if len(s) > 1 for n in s} == together


def test_the_same_root_again_has_no_trust_phase(state: ClusterState) -> None:
    agents = TrustingAgents()
    ca = CA.new()
    asyncio.run(_coordinator(state, agents).roll_out([_proposal(ca)], ACTOR))
    for agent in agents.by_name.values():
        agent.calls = []
    asyncio.run(_coordinator(state, agents).roll_out([_proposal(ca)], ACTOR))
    assert {tuple(a.calls) for a in agents.by_name.values()} == {("stage", "commit")}


def test_a_node_that_refuses_the_root_stops_everything_before_staging(
    state: ClusterState,
) -> None:
    agents = TrustingAgents()
    agents.by_name["node-2"].refuse_trust = True
    with pytest.raises(NodesNotUpdated) as raised:
        asyncio.run(_coordinator(state, agents).roll_out([_proposal(CA.new())], ACTOR))
    assert raised.value.description == (
        "the update was aborted before staging: 1 of 3 nodes could not trust the new root "
        "(node-2); no node changed"
    )
    failed = [n for n in raised.value.nodes if not n["ok"]]
    assert [(n["name"], n["step"]) for n in failed] == [("node-2", "trust")]
    for agent in agents.by_name.values():
        assert "stage" not in agent.calls
        assert agent.calls[-1] == "trust 0"  # the recorded (empty) set pinned again
        assert agent.pinned == set()
    assert run(state.trust()).roots == []
    assert run(state.rollout_in_flight()) is None
    assert run(state.certificate("proxy")) is None


def test_a_rollout_left_in_its_trust_phase_is_aborted_and_the_pins_restored(
    state: ClusterState,
) -> None:
    agents = TrustingAgents()
    for agent in agents.by_name.values():
        agent.pinned = {"left-over"}  # a dead control plane pinned a root it never recorded
    run(state.begin_rollout(
        RolloutRecord(
            rollout_id="r1", phase="trusting", generations={"proxy": 1},
            fingerprints={"proxy": "ab" * 32}, previous={"proxy": None}, actor=ACTOR,
            owner="gone", started_at="2026-01-01T00:00:00Z", trust_added=[INTERNAL.cert_pem],
        )
    ))  # fmt: skip
    asyncio.run(_coordinator(state, agents).resolve_in_flight())
    for agent in agents.by_name.values():
        assert agent.calls == ["abort", "trust 0"]
        assert agent.pinned == set()
    assert run(state.rollout_in_flight()) is None
