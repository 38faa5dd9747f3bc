"""Rotating the internal CA on a real cluster (control plane, agents, redis-server), with every
node's internode API polled throughout: no node ever loses contact.

One cluster is driven through the rotation with the control plane SIGKILLed at the end of each
phase (the TEST-ONLY seam, docs/reliability.md) and restarted; another rotates with a node
down (it comes back and converges), and answers 403 to a non-admin and 409 to a second rotate.
"""

from __future__ import annotations

import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from clusterkit import api, restart_server, wait_until
from conftest import start_cluster
from cryptography import x509

from clustercert import pki
from clustercert.certfiles import write_atomically
from clustercert.cli import main
from clustercert.clock import utc_now
from clustercert.control.faults import FAULT_ENV
from clustercert.control.state import run_blocking
from clustercert.demo import ADMIN_EMAIL, DemoCluster, DemoNode

pytestmark = pytest.mark.cluster

ROTATION_WAIT = 240.0  # bounds every wait for a phase; generous for a loaded machine


class NodePoller:
    """Calls every agent's internode status over a NEW connection every few tenths of a
    second, as the control plane would at that moment (its identity and ca.pem, read from the
    cluster directory each time), and records every failure."""

    def __init__(self, cluster: DemoCluster) -> None:
        self.cluster = cluster
        self.failures: list[str] = []
        self.polls = 0
        self._answered: set[int] = set()  # agent pids that answered: up since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NodePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _context(self) -> ssl.SSLContext:
        directory = self.cluster.cluster
        for _ in range(20):  # the control plane may be rewriting the pair this instant
            try:
                ctx = ssl.create_default_context(cafile=str(directory.ca_file))
                ctx.load_cert_chain(directory.identity_cert, directory.identity_key)
                return ctx
            except (ssl.SSLError, OSError):
                time.sleep(0.05)
        raise AssertionError("the control plane's identity files never matched")

    def _run(self) -> None:
        while not self._stop.is_set():
            context = self._context()
            for node in self.cluster.nodes:
                process = node.process
                if process is None or process.poll() is not None:
                    continue  # a node the test stopped on purpose
                try:
                    with httpx.Client(verify=context, timeout=10) as client:
                        answer = client.get(f"{node.agent_url}/internal/status")
                    if answer.status_code == 200:
                        self._answered.add(process.pid)
                    else:
                        self.failures.append(f"{node.name}: {answer.status_code} {answer.text}")
                except httpx.HTTPError as exc:
                    if process.pid in self._answered:  # not one still starting
                        self.failures.append(f"{node.name}: {type(exc).__name__}: {exc}")
            self.polls += 1
            self._stop.wait(0.3)


def _ca(cluster: DemoCluster) -> dict[str, Any]:
    with api(cluster) as client:  # a new client: the API's certificate changes on the way
        answer = client.get("/v1/cluster/ca")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_done(cluster: DemoCluster, rotation: int) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        try:
            state = _ca(cluster)
        except httpx.HTTPError:
            return None
        return state if state["rotation"] == rotation and state["phase"] == "done" else None

    result: dict[str, Any] = wait_until(done, ROTATION_WAIT, 0.5, "the rotation to finish")
    return result


def _stored_phase(cluster: DemoCluster) -> str:
    with cluster.cluster.open_store() as store:
        record = run_blocking(cluster.cluster.state(store).ca_record())
    assert record is not None
    return record.phase


def _fp(cert: x509.Certificate) -> str:
    return pki.fingerprint_sha256(cert)


def _node_files(node: DemoNode) -> tuple[set[str], x509.Certificate]:
    identity = node.directory / "identity"
    cas = {_fp(c) for c in x509.load_pem_x509_certificates((identity / "ca.pem").read_bytes())}
    return cas, x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes())


def _redis_client(node: DemoNode, ca_file: Path, cert: Path, key: Path) -> redis.Redis:
    """A verifying TLS client of the node's redis trusting ``ca_file``, presenting ``cert``;
    no retries, so a refusal is one handshake."""
    return redis.Redis(
        host="127.0.0.1", port=node.redis_port, ssl=True, ssl_cert_reqs="required",
        ssl_ca_certs=str(ca_file), ssl_check_hostname=False, ssl_certfile=str(cert),
        ssl_keyfile=str(key), socket_timeout=10, retry=None,
    )  # fmt: skip


def _issue_client(cluster: DemoCluster, where: Path) -> tuple[Path, Path]:
    """An operator's redis client certificate from the cluster's signing CA now."""
    where.mkdir(mode=0o700, exist_ok=True)
    pair = pki.issue_leaf(cluster.cluster.ca(), "redis-op", sans=(), eku={"clientAuth"},
                          now=utc_now())  # fmt: skip
    write_atomically(where / "key.pem", pair.key_pem.encode())
    write_atomically(where / "cert.pem", pair.cert_pem.encode(), 0o644)
    return where / "cert.pem", where / "key.pem"


def _check_rotated(cluster: DemoCluster, old_ca: x509.Certificate, old_client: Path) -> None:
    """After a finished rotation: every node trusts only the new CA and serves an identity it
    issued, every node is in sync, redis accepts clients of the new CA and refuses the old."""
    state = _ca(cluster)
    new_fp = state["fingerprint"]
    assert state["trusted"] == [new_fp] and new_fp != _fp(old_ca)
    directory_cas = x509.load_pem_x509_certificates(cluster.cluster.ca_file.read_bytes())
    assert [_fp(c) for c in directory_cas] == [new_fp]
    for node in cluster.nodes:
        cas, identity = _node_files(node)
        assert cas == {new_fp}, node.name
        assert identity.issuer == directory_cas[0].subject, node.name

    def in_sync() -> bool:
        with api(cluster) as client:
            return all(n["in_sync"] for n in client.get("/v1/nodes").json())

    wait_until(in_sync, ROTATION_WAIT, 0.5, "every node in sync")
    new_client = _issue_client(cluster, cluster.directory / "new-client")
    old_ca_file = cluster.directory / "old-ca.pem"
    for node in cluster.nodes:
        with _redis_client(node, cluster.cluster.ca_file, *new_client) as client:
            assert client.ping()
        # The operator's client certificate from the old CA is refused now.
        with (
            _redis_client(node, cluster.cluster.ca_file, old_client,
                          old_client.with_name("key.pem")) as client,
            pytest.raises(redis.ConnectionError),
        ):  # fmt: skip
            client.ping()
        # A client that trusts only the old CA cannot verify what redis serves.
        with (
            _redis_client(node, old_ca_file, *new_client) as client,
            pytest.raises(redis.ConnectionError),
        ):
            client.ping()


def _wait_killed(cluster: DemoCluster) -> None:
    server = cluster.server
    assert server is not None
    wait_until(lambda: server.poll() is not None, ROTATION_WAIT, 0.2, "the SIGKILL")
    assert server.returncode == -signal.SIGKILL


def _start_with_fault(cluster: DemoCluster, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, step)
    cluster.start_server()
    monkeypatch.delenv(FAULT_ENV)


@pytest.fixture
def rotating_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory, 3, "--reconcile-interval", "0.2")
    (running.directory / "old-ca.pem").write_bytes(running.cluster.ca_file.read_bytes())
    yield running
    running.stop()


def test_a_control_plane_killed_in_every_phase_finishes_the_rotation(
    rotating_cluster: DemoCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = rotating_cluster
    old_ca = cluster.cluster.ca().cert
    old_client = cluster.redis_client[0]
    with NodePoller(cluster) as poller:
        restart_server(cluster, fault="ca_trusting")
        with api(cluster) as client:
            started = client.post("/v1/cluster/ca/rotate")
        assert started.status_code == 202, started.text
        assert started.json()["phase"] == "trusting"
        rotation = started.json()["rotation"]
        _wait_killed(cluster)
        assert _stored_phase(cluster) == "trusting"
        for phase in ("reissuing", "switching", "retiring"):
            _start_with_fault(cluster, f"ca_{phase}", monkeypatch)
            _wait_killed(cluster)
            assert _stored_phase(cluster) == phase
        cluster.start_server()
        cluster.wait_for_api(60)
        state = _wait_done(cluster, rotation)
        print(f"phases: {state['phase_started']}, rollouts: {state['rollouts']}")
        _check_rotated(cluster, old_ca, old_client)
    assert poller.polls > 10
    assert poller.failures == []


def test_a_node_down_during_the_rotation_comes_back_and_converges(
    rotating_cluster: DemoCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = rotating_cluster
    old_ca = cluster.cluster.ca().cert
    with api(cluster) as admin:
        viewer = {"email": "viewer@cluster.local", "password": "viewer-pw-1", "role": "db_viewer"}
        assert admin.post("/v1/users", json=viewer).status_code == 200
        before = admin.get("/v1/cluster/ca").json()
    with api(cluster, auth=(viewer["email"], viewer["password"])) as client:
        refused = client.post("/v1/cluster/ca/rotate")
    assert refused.status_code == 403
    assert refused.json()["error_code"] == "insufficient_permissions"
    assert _ca(cluster) == before  # nothing started

    late = cluster.nodes[2]
    assert late.process is not None
    late.process.send_signal(signal.SIGTERM)
    late.process.wait(timeout=20)
    with NodePoller(cluster) as poller:
        with api(cluster) as client:
            started = client.post("/v1/cluster/ca/rotate")
            assert started.status_code == 202, started.text
            rotation = started.json()["rotation"]
            again = client.post("/v1/cluster/ca/rotate")
        assert again.status_code == 409
        assert again.json()["error_code"] == "ca_rotation_in_progress"
        assert "already running" in again.json()["description"]
        assert _ca(cluster)["rotation"] == rotation  # the second request started nothing
        waiting = wait_until(
            lambda: (s := _ca(cluster))["state"] == "waiting_for_nodes" and s,
            ROTATION_WAIT, 0.5, "the rotation to wait for the stopped node",
        )  # fmt: skip
        assert waiting["waiting_for_nodes"] == [late.name]
        assert waiting["phase"] == "trusting"
        cluster.start_agent(late)  # the same identity: no new join token
        _wait_done(cluster, rotation)
        # The whole rotation once more with every node up, as an operator runs it (the CLI
        # follows the phases to the end): what each phase costs.
        login = ["--url", cluster.api_url, "--user", ADMIN_EMAIL,
                 "--password", str(cluster.admin_password),
                 "--ca-file", str(cluster.cluster.ca_file)]  # fmt: skip
        timed = time.monotonic()
        code = main(["ca", "rotate", "--timeout", str(ROTATION_WAIT), *login])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "rotation #" in out and "done: the internal CA is" in out, out
        state = _ca(cluster)
        assert state["phase"] == "done" and state["rotation"] == rotation + 1
        assert main(["ca", "status", *login]) == 0
        assert state["fingerprint"][:16] in capsys.readouterr().out
        print(
            f"rotation with every node up: {time.monotonic() - timed:.1f} s, "
            f"phases began {state['phase_started']}, {state['rollouts']} rollout(s)"
        )
    _check_rotated(cluster, old_ca, cluster.redis_client[0])
    assert poller.polls > 10
    assert poller.failures == []
