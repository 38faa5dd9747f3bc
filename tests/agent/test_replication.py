"""The demo's replicated database under rotation: node-1's redis-server is the primary, the
others replicate from it over mutual TLS (``tls-replication``, ``tls-auth-clients yes``).

Every rotation of a name redis uses must leave every link working: after the commit, forced
reconnects (``CLIENT KILL TYPE replica`` on the primary) come back and a fresh write reaches
every replica. Real redis-server processes, real TLS; nothing is mocked. Relink times are
printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from asyncio import run
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from certfactory import CA, Leaf, cert_pem
from clusterkit import (
    api,
    fingerprint,
    leaf_for,
    link_up,
    prove_replication,
    put,
    redis_admin,
    redis_tls,
    served_by_node,
    trusted_by,
    wait_until,
)
from conftest import start_cluster

from clustercert.clock import utc_now
from clustercert.demo import DemoCluster, DemoNode, free_port

pytestmark = pytest.mark.cluster


def _rotate(cluster: DemoCluster, name: str, leaf: Leaf) -> dict[str, Any]:
    started = time.monotonic()
    response = put(cluster, {"name": name, "certificate": leaf.full_chain_pem, "key": leaf.key_pem})
    assert response.status_code == 200, response.text
    print(f"\n{name}: rotation answered in {time.monotonic() - started:.3f} s")
    body: dict[str, Any] = response.json()
    return body


def _links(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every node's proven links from a 200 answer."""
    return {
        n["name"]: [link for c in n["certificates"] for link in c.get("links", [])]
        for n in body["nodes"]
    }


def test_the_demo_database_replicates_over_mutual_tls(cluster: DemoCluster) -> None:
    primary, replicas = cluster.nodes[0], cluster.nodes[1:]
    assert redis_admin(primary).info("replication")["role"] == "master"
    for node in replicas:
        assert redis_admin(node).info("replication")["role"] == "slave"
        assert redis_admin(node).config_get("tls-replication") == {"tls-replication": "yes"}
    assert redis_admin(primary).config_get("tls-auth-clients") == {"tls-auth-clients": "yes"}
    prove_replication(cluster, "initial")


def test_a_client_without_a_certificate_is_refused(cluster: DemoCluster) -> None:
    bare = redis.Redis(
        host="127.0.0.1", port=cluster.nodes[0].redis_port, ssl=True, ssl_cert_reqs="none",
        ssl_check_hostname=False, socket_timeout=5,
    )  # fmt: skip
    with pytest.raises(redis.ConnectionError):
        bare.ping()


def test_proxy_rotation_within_one_ca_relinks_every_replica(cluster: DemoCluster) -> None:
    ca = CA.new()
    for round_ in range(2):
        leaf = leaf_for(ca, "proxy")
        body = _rotate(cluster, "proxy", leaf)
        assert set(served_by_node(cluster).values()) == {leaf.fingerprint}
        links = _links(body)
        # The primary proved its new server certificate to every replica (relink + WAIT).
        (primary_link,) = links[cluster.nodes[0].name]
        assert primary_link["ok"] and primary_link["link"] == "2 replica(s) of this primary"
        print(f"  primary's proof: {primary_link['seconds']:.3f} s")
        prove_replication(cluster, f"same-ca-{round_}")


def test_proxy_rotation_to_a_new_ca_trusts_the_root_first(cluster: DemoCluster) -> None:
    ca = CA.new()
    assert all(fingerprint(ca.cert) not in trusted_by(n) for n in cluster.nodes)
    leaf = leaf_for(ca, "proxy")
    body = _rotate(cluster, "proxy", leaf)
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}
    assert all(fingerprint(ca.cert) in trusted_by(n) for n in cluster.nodes)
    assert all(link["ok"] for node_links in _links(body).values() for link in node_links)
    prove_replication(cluster, "new-ca")


def test_data_internode_rotation_relinks_with_the_new_client_certificate(
    cluster: DemoCluster,
) -> None:
    leaf = leaf_for(CA.new(), "data_internode_encryption")
    body = _rotate(cluster, "data_internode_encryption", leaf)
    links = _links(body)
    assert links[cluster.nodes[0].name] == []  # the primary has no outgoing link
    for node in cluster.nodes[1:]:
        (link,) = links[node.name]
        assert link["ok"], link
        assert link["link"] == f"replication from 127.0.0.1:{cluster.nodes[0].redis_port}"
        print(f"  {node.name} relinked with its new client certificate in {link['seconds']} s")
        configured = redis_admin(node).config_get("tls-client-cert-file")["tls-client-cert-file"]
        assert Path(configured).read_text().startswith(cert_pem(leaf.cert))
    prove_replication(cluster, "data-internode")


@pytest.mark.parametrize(
    ("knobs", "error_code", "says"),
    [
        ({"eku": ["serverAuth"]}, "missing_extended_key_usage", "clientAuth"),
        # A primary's OpenSSL would refuse it as a client: no digitalSignature.
        ({"key_usage": ["keyEncipherment"]}, "key_usage_mismatch", "digitalSignature"),
    ],
    ids=["no-client-auth", "no-digital-signature"],
)
def test_a_data_internode_certificate_a_primary_would_refuse_is_refused_first(
    cluster: DemoCluster, knobs: dict[str, Any], error_code: str, says: str
) -> None:
    with api(cluster) as client:
        before = client.get("/v1/cluster/certificates/data_internode_encryption").json()
    bundles = {n.name: trusted_by(n) for n in cluster.nodes}
    leaf = CA.new().issue("redis.example", sans=["redis.example"], **knobs)
    response = put(
        cluster,
        {"name": "data_internode_encryption", "certificate": leaf.full_chain_pem,
         "key": leaf.key_pem},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == error_code
    assert says in response.json()["description"]
    with api(cluster) as client:
        after = client.get("/v1/cluster/certificates/data_internode_encryption").json()
    assert after["generation"] == before["generation"]
    assert after["fingerprint_sha256"] == before["fingerprint_sha256"]
    assert {n.name: trusted_by(n) for n in cluster.nodes} == bundles


class _Load:
    """Client load on every node until stopped: each command on a new TLS connection that
    verifies the server against ``cafile`` and presents the operator certificate (raw RESP over
    the socket, so the handshakes, not a client library, set the pace); writes go to the
    primary, reads to every node. A failed handshake, connection or command is a failure."""

    def __init__(self, cluster: DemoCluster, cafile: Path) -> None:
        self.cluster = cluster
        self.context = ssl.create_default_context(cafile=str(cafile))
        self.context.check_hostname = False  # the servers are named redis.example, not by IP
        self.context.load_cert_chain(*cluster.redis_client)
        self.commands = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(3)]

    def _command(self, port: int, *args: bytes) -> bytes:
        request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            self.context.wrap_socket(raw) as tls,
        ):
            tls.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = tls.recv(256)
                if not chunk:
                    break
                reply += chunk
        return reply

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set() and self.commands < 100_000:
            node = self.cluster.nodes[turn % len(self.cluster.nodes)]
            turn += 1
            key = b"load-%d" % index
            command = (
                (b"SET", key, b"%d" % turn) if node is self.cluster.nodes[0] else (b"GET", key)
            )
            try:
                reply = self._command(node.redis_port, *command)
                if not reply or reply.startswith(b"-"):
                    self.failures.append(f"{node.name}: {command[0]!r} answered {reply[:80]!r}")
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(f"{node.name}: {exc!r}")
            self.commands += 1

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def load_ca_file(cluster: DemoCluster, tmp_path: Path) -> Iterator[tuple[Path, list[CA]]]:
    """A CA file with the internal CA and the CAs the load test will rotate to; clients verify
    against it, so a certificate nobody expected is a failed command."""
    cas = [CA.new() for _ in range(2)]
    with api(cluster) as client:  # what the nodes serve now (an earlier test's CA)
        current: str = client.get("/v1/cluster/certificates").json()["proxy_cert"]
    path = tmp_path / "clients-trust.pem"
    path.write_text(
        cluster.cluster.ca_file.read_text() + current + "".join(cert_pem(ca.cert) for ca in cas)
    )
    yield path, cas


def test_rotations_under_client_load_fail_no_command(
    cluster: DemoCluster, load_ca_file: tuple[Path, list[CA]]
) -> None:
    cafile, (first, second) = load_ca_file
    with _Load(cluster, cafile) as load:
        wait_until(lambda: load.commands > 20, timeout=30, what="the load to start")
        _rotate(cluster, "proxy", leaf_for(first, "proxy"))
        _rotate(cluster, "data_internode_encryption", leaf_for(second, "data_internode_encryption"))
        _rotate(cluster, "proxy", leaf_for(second, "proxy"))
        prove_replication(cluster, "under-load")
    print(f"  load: {load.commands} commands, {len(load.failures)} failed")
    assert load.commands > 20
    assert load.failures == []


# --- faults: a dedicated cluster, so the shared one is never left broken ---------------------


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory)
    yield running
    running.stop()


def test_a_replica_that_cannot_relink_is_reported_then_converges(faulty: DemoCluster) -> None:
    """A replica whose primary is unreachable (an operator pointed it elsewhere) fails its link
    proof: a 409 names it and says why; the others commit. Once it points back, the reconciler
    brings it in sync and replication carries writes again."""
    lost = faulty.nodes[2]
    redis_admin(lost).execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        leaf = leaf_for(CA.new(), "data_internode_encryption")
        response = put(
            faulty,
            {"name": "data_internode_encryption", "certificate": leaf.full_chain_pem,
             "key": leaf.key_pem},
        )  # fmt: skip
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["error_code"] == "nodes_not_updated"
        failed = {n["name"]: n for n in body["nodes"] if not n["ok"]}
        assert list(failed) == [lost.name]
        assert "did not come back within 5 s" in failed[lost.name]["error"]
        assert "replicates from 127.0.0.1:1, not from the configured" in failed[lost.name]["error"]
    finally:
        redis_admin(lost).execute_command("REPLICAOF", "127.0.0.1", str(faulty.nodes[0].redis_port))
    faulty.wait_in_sync(60)
    prove_replication(faulty, "relinked")


def test_a_replica_killed_during_a_rotation_converges(faulty: DemoCluster) -> None:
    """SIGKILL a replica's redis, rotate: the agent restarts it with the new files on commit,
    it resyncs from the primary, and every node serves the new certificate."""
    killed = faulty.nodes[1]
    pid = killed.redis_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    leaf = leaf_for(CA.new(), "proxy")
    response = put(
        faulty, {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    )
    assert response.status_code in (200, 409), response.text
    faulty.wait_in_sync(60)
    assert set(served_by_node(faulty).values()) == {leaf.fingerprint}
    assert killed.redis_pid != pid
    wait_until(lambda: link_up(killed), timeout=15, what="the restarted replica to link")
    prove_replication(faulty, "after-kill")


def test_a_single_node_is_a_lone_primary(tmp_path_factory: pytest.TempPathFactory) -> None:
    lone = start_cluster(tmp_path_factory, 1)
    try:
        (node,) = lone.nodes
        assert lone.describe()["nodes"][0]["redis"]["role"] == "primary"
        assert redis_admin(node).info("replication")["connected_slaves"] == 0
        body = _rotate(lone, "proxy", leaf_for(CA.new(), "proxy"))
        assert _links(body) == {node.name: []}  # no replica, nothing to relink
        assert redis_tls(lone, node).set("lone", "1")
    finally:
        lone.stop()


def _start_outside_source(directory: Path, server: Leaf, accepts_clients_of: CA) -> int:
    """A redis-server outside the cluster (Replica Of's source): its own server certificate,
    and it accepts only clients whose certificate chains to ``accepts_clients_of``."""
    cert, key = server.write(directory, "source")
    trusted = directory / "source-trusts.pem"
    trusted.write_text(cert_pem(accepts_clients_of.cert))
    port = free_port()
    subprocess.run(
        [
            "redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(trusted), "--tls-auth-clients", "yes",
            "--repl-diskless-sync-delay", "0",
            "--unixsocket", str(directory / "source.sock"), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--pidfile", str(directory / "source.pid"), "--logfile", str(directory / "source.log"),
            "--daemonize", "yes",
        ],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return port


def _add_outside_replica(cluster: DemoCluster, source_port: int, source_ca: Path) -> DemoNode:
    """A node whose redis replicates from the source outside the cluster, presenting
    ``syncer``, and trusting the source's CA through ``extra_ca_file``."""
    directory = cluster.directory / "nodes" / "node-ext"
    directory.mkdir(parents=True)
    node = DemoNode("node-ext", directory, free_port(), free_port())
    with cluster.cluster.open_store() as store:
        token = run(
            cluster.cluster.state(store).new_join_token(utc_now(), dt.timedelta(minutes=10))
        )
    node.config_file.write_text(
        f'name = "node-ext"\ndata_dir = "{directory}"\nlisten = "127.0.0.1:{node.agent_port}"\n'
        f'control_plane_url = "{cluster.api_url}"\nca_file = "{cluster.cluster.ca_file}"\n'
        f'join_token = "{token}"\n\n[[services]]\nname = "redis"\ntype = "redis"\n'
        'certificate = "proxy"\nclient_certificate = "syncer"\n'
        f'replicaof = "127.0.0.1:{source_port}"\nextra_ca_file = "{source_ca}"\n'
        f'socket = "{directory / "redis.sock"}"\naddress = "127.0.0.1:{node.redis_port}"\n'
        "supervise = true\n"
    )
    cluster.nodes.append(node)
    cluster.start_agent(node)
    return node


def test_syncer_is_the_client_certificate_towards_a_source_outside_the_cluster(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Replica Of: a node's redis replicates from a redis-server outside the cluster. It
    presents `syncer`, trusts the source through `extra_ca_file`; a `syncer` rotation relinks
    it, and one the source would not accept is a 409 that names the node and why."""
    outside, accepted = CA.new(), CA.new()
    server = outside.issue("source.example", sans=["localhost", "127.0.0.1"], eku=["serverAuth"])
    source_port = _start_outside_source(tmp_path, server, accepted)
    source_ca = tmp_path / "outside-ca.pem"
    source_ca.write_text(cert_pem(outside.cert))
    source = redis.Redis(unix_socket_path=str(tmp_path / "source.sock"), socket_timeout=10)
    cluster = start_cluster(tmp_path_factory, 1)
    try:
        assert put(cluster, _syncer_body(accepted)).status_code == 200  # what the source accepts
        node = _add_outside_replica(cluster, source_port, source_ca)
        cluster.wait_in_sync(60)
        wait_until(lambda: link_up(node), timeout=15, what="the link to the outside source")
        assert source.set("from-outside", "1")
        wait_until(lambda: redis_tls(cluster, node).get("from-outside") == b"1", timeout=10)

        body = _rotate(cluster, "syncer", leaf_for(accepted, "syncer"))
        (link,) = _links(body)["node-ext"]
        assert link["ok"] and link["link"] == f"replication from 127.0.0.1:{source_port}"
        assert _links(body)["node-1"] == []  # it replicates from nobody

        response = put(cluster, _syncer_body(CA.new()))  # a CA the source does not trust
        assert response.status_code == 409, response.text
        failed = {n["name"]: n for n in response.json()["nodes"] if not n["ok"]}
        assert list(failed) == ["node-ext"]
        assert "did not come back within 5 s" in failed["node-ext"]["error"]
        assert "does the primary trust this node's syncer" in failed["node-ext"]["error"]
    finally:
        cluster.stop()
        source.shutdown(nosave=True)


def _syncer_body(ca: CA) -> dict[str, str]:
    leaf = leaf_for(ca, "syncer")
    return {"name": "syncer", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
