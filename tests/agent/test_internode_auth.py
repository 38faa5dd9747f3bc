"""Internode trust (DESIGN §8): agents answer only the control plane's internal-CA identity; the
control plane talks only to agents holding an internal-CA certificate; join tokens are
one-time, expiring, and stored hashed.

Uses the shared cluster without changing it (a token reuse re-joins node-1 with its own URL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from asyncio import run
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from certfactory import CA
from clusterkit import api
from cryptography import x509

from clustercert import pki
from clustercert.cli import main
from clustercert.control.agents import AgentClient, internode_client_context
from clustercert.control.directory import init_cluster
from clustercert.control.state import NodeRecord
from clustercert.demo import DemoCluster
from clustercert.errors import AgentUnavailable
from clustercert.internode import (
    CONTROL_PLANE_URI,
    METRICS_SCRAPER_URI,
    StatusAnswer,
    has_identity,
)

UTC = dt.UTC


def _agent_client(cluster: DemoCluster, identity: tuple[Path, Path] | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(cluster.cluster.ca_file))
    if identity is not None:
        context.load_cert_chain(*identity)
    return httpx.Client(base_url=cluster.nodes[0].agent_url, verify=context, timeout=10)


def _write_pair(tmp_path: Path, stem: str, cert: str, key: str) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    cert_file.write_text(cert)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return cert_file, key_file


def test_an_agent_answers_only_the_control_plane(cluster: DemoCluster, tmp_path: Path) -> None:
    directory = cluster.cluster
    foreign = CA.new().issue("clustercert-control-plane", sans=[], eku=["clientAuth"])
    other_node = cluster.nodes[1].directory / "identity"
    callers: dict[str, tuple[Path, Path] | None] = {
        "no certificate": None,
        "a clientAuth certificate from another CA": _write_pair(
            tmp_path, "foreign", foreign.full_chain_pem, foreign.key_pem
        ),
        "another node's identity (internal CA, serverAuth only)": (
            other_node / "cert.pem",
            other_node / "key.pem",
        ),
    }
    for caller, identity in callers.items():
        with _agent_client(cluster, identity) as client, pytest.raises(
            httpx.HTTPError
        ):  # fmt: skip
            client.get("/internal/status")
            pytest.fail(f"the agent answered {caller}")
    control_plane = (directory.identity_cert, directory.identity_key)
    with _agent_client(cluster, control_plane) as client:
        answer = client.get("/internal/status")
    assert answer.status_code == 200
    assert answer.json()["etcd_member"] is False  # no member here: new roots pinned in parallel


class RogueAgent:
    """A TLS server posing as an agent on 127.0.0.1: records any HTTP it is sent."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    data = tls.recv(65536)
                    self.received.append(data)
                    body = b'{"node_id": 99, "name": "rogue", "certificates": {}}'
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                    )
            except (ssl.SSLError, OSError):
                raw.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def rogue_pairs(cluster: DemoCluster, tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    now = dt.datetime.now(UTC)
    foreign = CA.new().issue("127.0.0.1", sans=["127.0.0.1"], eku=["serverAuth"])
    internal = pki.issue_leaf(
        cluster.cluster.ca(), "127.0.0.1", sans=("127.0.0.1",), eku={"serverAuth"}, now=now
    )
    return {
        "foreign": _write_pair(tmp_path, "foreign", foreign.chain_pem, foreign.key_pem),
        "internal": _write_pair(tmp_path, "internal", internal.cert_pem, internal.key_pem),
    }


@pytest.fixture
def rogues(rogue_pairs: dict[str, tuple[Path, Path]]) -> Iterator[dict[str, RogueAgent]]:
    started = {name: RogueAgent(*pair) for name, pair in rogue_pairs.items()}
    yield started
    for rogue in started.values():
        rogue.close()


def test_the_control_plane_talks_only_to_agents_with_a_cluster_certificate(
    cluster: DemoCluster, rogues: dict[str, RogueAgent]
) -> None:
    directory = cluster.cluster
    context = internode_client_context(
        directory.ca_file, directory.identity_cert, directory.identity_key
    )

    async def status(rogue: RogueAgent) -> StatusAnswer:
        node = NodeRecord(99, "rogue", f"https://127.0.0.1:{rogue.port}", "")
        client = AgentClient(node, context, timeout=5)
        try:
            return await client.status()
        finally:
            await client.aclose()

    with pytest.raises(AgentUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(status(rogues["foreign"]))
    assert rogues["foreign"].received == []  # not one byte of HTTP reached the impostor
    # The same server with an internal-CA certificate is talked to: the test can tell.
    assert asyncio.run(status(rogues["internal"])).name == "rogue"
    assert rogues["internal"].received[0].startswith(b"GET /internal/status")


def _join(cluster: DemoCluster, token: str) -> httpx.Response:
    node = cluster.nodes[0]
    body = {
        "token": token,
        "name": node.name,
        "agent_url": node.agent_url,
        "csr": pki.make_csr(pki.new_private_key(), node.name),
    }
    with api(cluster, auth=None) as client:
        return client.post("/v1/internal/join", json=body)


def _token(cluster: DemoCluster, issued: dt.datetime, ttl: dt.timedelta) -> str:
    with cluster.cluster.open_store() as store:
        return run(cluster.cluster.state(store).new_join_token(issued, ttl))


def test_a_join_token_works_once(cluster: DemoCluster) -> None:
    token = _token(cluster, dt.datetime.now(UTC), dt.timedelta(minutes=5))
    first = _join(cluster, token)
    assert first.status_code == 200, first.text
    assert first.json()["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    stolen = _join(cluster, token)
    assert stolen.status_code == 401
    assert stolen.json()["error_code"] == "unauthorized"
    assert "unknown, already used or expired" in stolen.json()["description"]
    store_bytes = b"".join(p.read_bytes() for p in cluster.directory.glob("store.db*"))
    assert token.encode() not in store_bytes  # only its SHA-256 is kept


def test_an_expired_or_unknown_join_token_is_refused(cluster: DemoCluster) -> None:
    expired = _token(cluster, dt.datetime.now(UTC) - dt.timedelta(hours=2), dt.timedelta(hours=1))
    for token in (expired, "made-up-token"):
        refused = _join(cluster, token)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error_code"] == "unauthorized"
    almost = _token(cluster, dt.datetime.now(UTC) - dt.timedelta(minutes=59), dt.timedelta(hours=1))
    assert _join(cluster, almost).status_code == 200  # the boundary is the expiry, not before


INTERNODE_CALLS = [
    ("GET", "/internal/status"),
    ("PUT", "/internal/certificates/proxy/99"),
    ("POST", "/internal/certificates/proxy/99/commit"),
    ("DELETE", "/internal/certificates/proxy/99"),
    ("DELETE", "/internal/certificates/proxy"),
]


def test_a_metrics_scraper_certificate_reads_metrics_but_calls_no_internode_route(
    cluster: DemoCluster, tmp_path: Path
) -> None:
    """Issue #11: an internal-CA clientAuth certificate is not enough for the internode API;
    the agent wants the control plane's URI SAN. `metrics-client-cert` issues one for Prometheus
    that the metrics listener takes (real agent processes)."""
    directory = cluster.cluster
    cert, key = tmp_path / "scraper.pem", tmp_path / "scraper.key"
    argv = ["metrics-client-cert", "--dir", str(directory.path)]
    assert main([*argv, "--out-cert", str(cert), "--out-key", str(key)]) == 0
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    assert has_identity(leaf, METRICS_SCRAPER_URI)
    assert not has_identity(leaf, CONTROL_PLANE_URI)
    assert key.stat().st_mode & 0o777 == 0o600
    control_plane = (directory.identity_cert, directory.identity_key)
    with _agent_client(cluster, control_plane) as client:
        before = client.get("/internal/status").json()
    body = {"certificate": "x", "key": None}
    with _agent_client(cluster, (cert, key)) as scraper:
        for method, path in INTERNODE_CALLS:
            response = scraper.request(method, path, json=body if method == "PUT" else None)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json() == {
                "error": f"only the control plane ({CONTROL_PLANE_URI}) may call this agent"
            }
        node = cluster.nodes[0]
        metrics = scraper.get(f"https://127.0.0.1:{node.metrics_port}/metrics")
        assert metrics.status_code == 200
        assert "clustercert_node_certificate_generation" in metrics.text
    with _agent_client(cluster, control_plane) as client:
        assert client.get("/internal/status").json() == before  # nothing changed


def test_an_old_control_plane_identity_is_reissued_with_its_uri(tmp_path: Path) -> None:
    """A directory made before agents checked the URI SAN: the server reissues the identity
    at start (ensure_control_plane_identity), from the CA; a current one is kept."""
    now = dt.datetime.now(UTC)
    made = init_cluster(
        tmp_path / "c", name="old.local", admin_email="a@x", admin_password="pw", now=now
    )
    directory = made.directory
    old = pki.issue_leaf(
        directory.ca(), "clustercert-control-plane", sans=(), eku={"clientAuth"}, now=now
    )
    directory.identity_cert.write_text(old.cert_pem)
    directory.identity_key.write_text(old.key_pem)
    assert directory.ensure_control_plane_identity(now) is True
    leaf = x509.load_pem_x509_certificates(directory.identity_cert.read_bytes())[0]
    assert has_identity(leaf, CONTROL_PLANE_URI)
    assert pki.is_issued_by(leaf, directory.ca().cert)
    ssl.create_default_context().load_cert_chain(directory.identity_cert, directory.identity_key)
    kept = directory.identity_cert.read_bytes()
    assert directory.ensure_control_plane_identity(now) is False
    assert directory.identity_cert.read_bytes() == kept
