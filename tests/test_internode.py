"""The internode messages (src/clustercert/internode.py): every message survives a JSON round
trip, writes the field names the wire has always used (an agent and a control plane of
different versions keep talking), and a payload with a renamed, missing, unknown or mistyped
field is rejected with an error naming the message and the field.

The last tests drive the agent's HTTP edge in-process (httpx's ASGI transport: no TLS, no
services) to show a bad request is refused there with 422 and nothing lands on disk; the
real-process suites (control/test_update_cert.py, agent/test_internode_auth.py) cover the same
edge over mutual TLS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from certfactory import CA, cert_pem
from clusterkit import fingerprint

from clustercert import pki
from clustercert.agent.app import Agent, Identity, build_app
from clustercert.agent.config import AgentConfig
from clustercert.internode import (
    CONTROL_PLANE_URI,
    AbortAnswer,
    CertificateStatus,
    CommitAnswer,
    LinkProof,
    MessageError,
    RemoveAnswer,
    ServedFingerprint,
    ServiceProof,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
    TrustAnswer,
    TrustRequest,
    certificate_name,
)

FP = "ab" * 32
PROOF = ServiceProof("redis", "proxy", True, FP, None)
MESSAGES: list[Any] = [
    StageRequest("-----BEGIN CERTIFICATE-----\n", "-----BEGIN PRIVATE KEY-----\n"),
    StageRequest("-----BEGIN CERTIFICATE-----\n", None),
    StageAnswer("proxy", 3),
    PROOF,
    ServiceProof("nginx", "api", False, None, "still serves the old certificate"),
    CommitAnswer("proxy", 3, FP, True, (PROOF,)),
    CommitAnswer("mtls_trusted_ca", 2, FP, True, ()),
    LinkProof("redis", "proxy", "2 replica(s) of this primary", True, 0.036),
    CommitAnswer(
        "data_internode_encryption",
        3,
        FP,
        False,
        (PROOF,),
        (
            LinkProof(
                "redis",
                "data_internode_encryption",
                "replication from 127.0.0.1:1",
                False,
                5.0,
                "did not come back",
            ),
        ),
    ),
    TrustRequest(("-----BEGIN CERTIFICATE-----\n",)),
    TrustAnswer((FP,), {"redis": (FP, "cd" * 32)}),
    StatusAnswer(3, "node-3", {}, None, (FP,)),
    AbortAnswer("proxy", 4),
    RemoveAnswer("ldap_client"),
    ServedFingerprint("redis", None),
    CertificateStatus(3, FP, (4, 5)),
    CertificateStatus(None, None, (), (ServedFingerprint("redis", FP),)),
    StatusAnswer(
        1,
        "node-1",
        {"proxy": CertificateStatus(3, FP, (), (ServedFingerprint("redis", FP),))},
        4242,
    ),
    StatusAnswer(2, "node-2", {}, None),
    StatusAnswer(4, "node-4", {}, None, (FP,), "b" * 16, FP, (FP,), etcd_member=True),
    StatusAnswer(5, "node-5", {}, None, etcd_member=False),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: Any) -> None:
    wire = json.loads(json.dumps(message.to_json()))
    assert type(message).from_json(wire) == message


def test_the_wire_shape_is_the_one_agents_have_always_spoken() -> None:
    assert CommitAnswer("proxy", 3, FP, True, (PROOF,)).to_json() == {
        "name": "proxy",
        "generation": 3,
        "fingerprint": FP,
        "ok": True,
        "services": [
            {
                "service": "redis",
                "certificate": "proxy",
                "ok": True,
                "served_fingerprint": FP,
                "error": None,
            }
        ],
    }
    assert StatusAnswer(1, "node-1", {"proxy": CertificateStatus(3, FP, (4,))}).to_json() == {
        "node_id": 1,
        "name": "node-1",
        "certificates": {"proxy": {"generation": 3, "fingerprint": FP, "staged": [4]}},
        "redis_pid": None,
    }
    assert StageRequest("C", None).to_json() == {"certificate": "C", "key": None}
    assert StageAnswer("proxy", 3).to_json() == {"name": "proxy", "generation": 3, "staged": True}
    assert AbortAnswer("proxy", 3).to_json() == {"name": "proxy", "generation": 3, "aborted": True}
    assert RemoveAnswer("api").to_json() == {"name": "api", "removed": True}


def _commit(**changes: Any) -> dict[str, Any]:
    wire = CommitAnswer("proxy", 3, FP, True, (PROOF,)).to_json()
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (
            {k: v for k, v in _commit().items() if k != "fingerprint"},
            r"^commit answer: missing field 'fingerprint'$",
        ),
        (
            {**{k: v for k, v in _commit().items() if k != "fingerprint"}, "fingerprnt": FP},
            r"^commit answer: missing field 'fingerprint'$",
        ),
        (
            _commit(extra=1),
            r"^commit answer: unknown field 'extra'; "
            r"expected name, generation, fingerprint, ok, services, links$",
        ),
        (_commit(ok="yes"), r"^commit answer: ok must be true or false, got str$"),
        (_commit(generation=True), r"^commit answer: generation must be an integer, got bool$"),
        (_commit(services={}), r"^commit answer: services must be a list, got dict$"),
        (
            _commit(services=[{**PROOF.to_json(), "served": FP}]),
            r"^service proof: unknown field 'served'",
        ),
        ([1, 2], r"^commit answer: expected a JSON object, got list$"),
    ],
    ids=["missing", "renamed", "unknown", "bool", "int", "list", "nested", "not-an-object"],
)
def test_a_commit_answer_that_does_not_match_is_rejected(payload: object, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        CommitAnswer.from_json(payload)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"name": "n", "certificates": {}}, r"^status answer: missing field 'node_id'$"),
        (
            {"node_id": 1, "name": "n", "certificates": {"proxy": {"generation": 1}}},
            r"^certificate status: missing field 'fingerprint', 'staged'$",
        ),
        (
            {
                "node_id": 1,
                "name": "n",
                "certificates": {"proxy": {"generation": 1, "fingerprint": FP, "staged": ["2"]}},
            },
            r"^certificate status: staged must be a list of integers, got list$",
        ),
        (
            {"node_id": 1, "name": "n", "certificates": [], "redis_pid": None},
            r"^status answer: certificates must be an object, got list$",
        ),
    ],
    ids=["missing", "nested-missing", "staged-type", "certificates-type"],
)
def test_a_status_answer_that_does_not_match_is_rejected(payload: object, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        StatusAnswer.from_json(payload)


def test_an_older_status_answer_without_redis_pid_is_read() -> None:
    answer = StatusAnswer.from_json({"node_id": 99, "name": "rogue", "certificates": {}})
    assert answer == StatusAnswer(99, "rogue", {}, None)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"key": None}, r"^stage request: missing field 'certificate'$"),
        ({"cert": "C"}, r"^stage request: missing field 'certificate'$"),
        ({"certificate": "C", "pem": "K"}, r"^stage request: unknown field 'pem'"),
        ({"certificate": 1}, r"^stage request: certificate must be a string, got int$"),
        ({"certificate": "C", "key": 1}, r"^stage request: key must be a string or null, got int$"),
        ("C", r"^stage request: expected a JSON object, got str$"),
    ],
)
def test_a_stage_request_that_does_not_match_is_rejected(payload: object, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        StageRequest.from_json(payload)


def test_a_stage_request_without_key_means_none() -> None:
    assert StageRequest.from_json({"certificate": "C"}) == StageRequest("C", None)


def test_targets_are_parsed_from_the_path() -> None:
    assert Target.parse("proxy", "7") == Target("proxy", 7)
    assert Target("proxy", 7).path == "/internal/certificates/proxy/7"
    assert certificate_name("api") == "api"
    with pytest.raises(MessageError, match=r"^unknown certificate name 'nope'$"):
        Target.parse("nope", "7")
    with pytest.raises(MessageError, match=r"^generation must be a number, got '-1'$"):
        Target.parse("proxy", "-1")
    with pytest.raises(MessageError, match=r"^unknown certificate name 'nope'$"):
        certificate_name("nope")


# --- the agent's edge, in-process ---------------------------------------------------------------


def _agent(tmp_path: Path) -> Agent:
    config = AgentConfig(
        name="node-1",
        data_dir=tmp_path / "data",
        listen=("127.0.0.1", 0),
        advertise_url="https://127.0.0.1:1",
        control_plane_url="https://127.0.0.1:2",
        ca_file=None,
        join_token=None,
        services=(),
    )
    identity = Identity(1, tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    return Agent(config, identity)


def _control_plane_pem() -> str:
    """A client certificate with the control plane's URI SAN, as the TLS extension shows it."""
    now = dt.datetime.now(dt.UTC)
    ca = pki.new_ca("test internal CA", now=now)
    pair = pki.issue_leaf(
        ca, "clustercert-control-plane", sans=(CONTROL_PLANE_URI,), eku={"clientAuth"}, now=now
    )
    return pair.cert_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"


CONTROL_PLANE_PEM = _control_plane_pem()


def _call(agent: Agent, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the agent's app, in-process (httpx's ASGI transport), made with the
    control plane's certificate in the TLS extension that uvicorn's protocol would fill."""
    app = build_app(agent)

    async def as_control_plane(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [CONTROL_PLANE_PEM]}
        await app(scope, receive, send)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=as_control_plane)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(call())


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "the body is not JSON"),
        (b'{"cert": "x"}', "stage request: missing field 'certificate'"),
        (b'{"certificate": "x", "key": null, "extra": 1}', "stage request: unknown field 'extra'"),
        (b'{"certificate": 5}', "stage request: certificate must be a string, got int"),
    ],
)
def test_the_agent_refuses_a_bad_stage_request_at_its_edge(
    tmp_path: Path, body: bytes, error: str
) -> None:
    agent = _agent(tmp_path)
    answer = _call(agent, "PUT", "/internal/certificates/proxy/1", content=body)
    assert answer.status_code == 422
    assert error in answer.json()["error"]
    status = StatusAnswer.from_json(_call(agent, "GET", "/internal/status").json())
    assert status.certificates == {}  # nothing landed
    assert agent.files.names() == []


def test_the_agent_answers_with_the_messages(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    leaf = CA.new().issue("node-1.cluster.local")
    staged = _call(
        agent,
        "PUT",
        "/internal/certificates/proxy/1",
        json=StageRequest(leaf.full_chain_pem, leaf.key_pem).to_json(),
    )
    assert StageAnswer.from_json(staged.json()) == StageAnswer("proxy", 1)
    status = StatusAnswer.from_json(_call(agent, "GET", "/internal/status?probe=true").json())
    assert status.certificates == {"proxy": CertificateStatus(None, None, (1,), ())}
    committed = _call(agent, "POST", "/internal/certificates/proxy/1/commit")
    assert CommitAnswer.from_json(committed.json()) == CommitAnswer(
        "proxy", 1, leaf.fingerprint, True, ()
    )
    unknown = _call(agent, "POST", "/internal/certificates/nope/1/commit")
    assert (unknown.status_code, unknown.json()) == (
        422,
        {"error": "unknown certificate name 'nope'"},
    )
    removed = _call(agent, "DELETE", "/internal/certificates/proxy")
    assert RemoveAnswer.from_json(removed.json()) == RemoveAnswer("proxy")
    assert agent.files.names() == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "the body is not JSON"),
        (b'{"root": []}', "trust request: missing field 'roots'"),
        (b'{"roots": "PEM"}', "trust request: roots must be a list of strings, got str"),
        (b'{"roots": ["not a certificate"]}', "trust request: a root is not a PEM certificate"),
    ],
)
def test_the_agent_refuses_a_bad_trust_request_and_keeps_its_pins(
    tmp_path: Path, body: bytes, error: str
) -> None:
    agent = _agent(tmp_path)
    root = CA.new().cert
    pinned = _call(agent, "PUT", "/internal/trust", json=TrustRequest((cert_pem(root),)).to_json())
    assert TrustAnswer.from_json(pinned.json()) == TrustAnswer((fingerprint(root),), {})
    answer = _call(agent, "PUT", "/internal/trust", content=body)
    assert answer.status_code == 422
    assert error in answer.json()["error"]
    status = StatusAnswer.from_json(_call(agent, "GET", "/internal/status").json())
    assert status.pinned == (fingerprint(root),)  # unchanged


def test_an_empty_trust_request_unpins_every_root(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    pem = cert_pem(CA.new().cert)
    _call(agent, "PUT", "/internal/trust", json=TrustRequest((pem,)).to_json())
    answer = _call(agent, "PUT", "/internal/trust", json=TrustRequest(()).to_json())
    assert TrustAnswer.from_json(answer.json()) == TrustAnswer((), {})
    assert StatusAnswer.from_json(_call(agent, "GET", "/internal/status").json()).pinned == ()


@pytest.mark.parametrize(
    ("key_of", "error"),
    [
        ("other", "the key does not match the certificate"),
        ("garbage", "the pair does not load"),
    ],
)
def test_the_agent_refuses_a_pair_that_does_not_match(
    tmp_path: Path, key_of: str, error: str
) -> None:
    agent = _agent(tmp_path)
    leaf = CA.new().issue("node-1.cluster.local")
    other = CA.new().issue("node-1.cluster.local")
    key = other.key_pem if key_of == "other" else "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END"
    answer = _call(
        agent,
        "PUT",
        "/internal/certificates/proxy/1",
        json=StageRequest(leaf.full_chain_pem, key).to_json(),
    )
    assert answer.status_code == 422
    assert error in answer.json()["error"]
    status = StatusAnswer.from_json(_call(agent, "GET", "/internal/status").json())
    # Nothing landed: no generation current, none staged, no leftover on disk.
    assert status.certificates == {"proxy": CertificateStatus(None, None, ())}
    assert [p.name for p in (agent.files.root / "proxy").iterdir()] == []
