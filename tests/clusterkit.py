"""Helpers for tests that drive a real cluster (control plane, agents, redis-server).

Everything here talks to real processes over real TLS on loopback; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from certfactory import CA, Leaf
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from clustercert import pki
from clustercert.clock import utc_now
from clustercert.control.faults import FAULT_ENV
from clustercert.demo import DemoCluster, DemoNode

__all__ = [
    "api",
    "desired_fingerprints",
    "fingerprint",
    "internal_proxy_body",
    "leaf_for",
    "link_up",
    "marker",
    "prove_replication",
    "redis_admin",
    "redis_tls",
    "restart_server",
    "served_by_node",
    "served_fingerprint",
    "trusted_by",
    "wait_until",
]


def served_fingerprint(host: str, port: int, server_name: str | None = None) -> str:
    """SHA-256 of the leaf a TLS server presents, by a real handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def served_by_node(cluster: DemoCluster) -> dict[str, str]:
    """What every node's redis serves right now, proven by handshake."""
    return {n.name: served_fingerprint("127.0.0.1", n.redis_port) for n in cluster.nodes}


def desired_fingerprints(cluster: DemoCluster) -> dict[str, str]:
    """What the store desires right now: each set name's leaf fingerprint, read over the API."""
    with api(cluster) as client:
        listed = client.get("/v1/cluster/certificates").json()
        names = [k[: -len("_cert")] for k in listed if k.endswith("_cert")]
        return {
            n: client.get(f"/v1/cluster/certificates/{n}").json()["fingerprint_sha256"]
            for n in names
        }


def api(
    cluster: DemoCluster,
    auth: tuple[str, str] | bool | None = True,
    client_cert: tuple[Path, Path] | None = None,
) -> httpx.Client:
    """A client for the cluster's API; ``auth=True`` logs in as admin, None sends no credentials;
    ``client_cert`` (certificate and key files) is presented in the TLS handshake."""
    if auth is True:
        assert cluster.admin_password is not None
        auth = ("admin@cluster.local", cluster.admin_password)
    verify = ssl.create_default_context(cafile=str(cluster.cluster.ca_file))
    if client_cert is not None:
        verify.load_cert_chain(*client_cert)
    return httpx.Client(
        base_url=cluster.api_url,
        auth=auth if isinstance(auth, tuple) else None,
        verify=verify,
        timeout=60,
    )


def wait_until(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}: {last!r}")


def proxy_body() -> tuple[dict[str, str], str]:
    """An update_cert body for `proxy` from a fresh test CA (full chain), and its fingerprint."""
    leaf = CA.new().issue("redis.example", sans=["redis.example", "localhost"], eku=["serverAuth"])
    body = {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    return body, leaf.fingerprint


def internal_proxy_body(cluster: DemoCluster) -> tuple[dict[str, str], str]:
    """An update_cert body for `proxy` issued by the cluster's internal CA, which every node
    trusts already: the update has no trust phase and goes straight to staging."""
    pair = pki.issue_leaf(
        cluster.cluster.ca(), "redis.example", sans=("redis.example", "localhost"),
        eku={"serverAuth"}, now=utc_now(),
    )  # fmt: skip
    leaf = x509.load_pem_x509_certificates(pair.cert_pem.encode())[0]
    return {"name": "proxy", "certificate": pair.cert_pem, "key": pair.key_pem}, fingerprint(leaf)


def put(cluster: DemoCluster, body: dict[str, str]) -> httpx.Response:
    """PUT /v1/cluster/update_cert as admin."""
    with api(cluster) as client:
        return client.put("/v1/cluster/update_cert", json=body)


def thaw(cluster: DemoCluster) -> None:
    """SIGCONT every running agent, so a test that froze one never leaves it stopped."""
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGCONT)


def restart_server(cluster: DemoCluster, fault: str | None = None) -> None:
    """Stop the control plane (if running) and start it again, with ``fault`` armed."""
    server = cluster.server
    if server is not None and server.poll() is None:
        server.terminate()
        server.wait(timeout=20)
    saved = os.environ.pop(FAULT_ENV, None)
    try:
        if fault:
            os.environ[FAULT_ENV] = fault
        cluster.start_server()
    finally:
        os.environ.pop(FAULT_ENV, None)
        if saved is not None:
            os.environ[FAULT_ENV] = saved
    cluster.wait_for_api(30)


def marker(cluster: DemoCluster, step: str) -> Path:
    """The file a control plane paused at ``step`` waits on (delete it to go on)."""
    return cluster.directory / "run" / f"fault-paused-{step}"


# --- the demo's replicated redis ---------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def leaf_for(ca: CA, name: str) -> Leaf:
    """A leaf from ``ca`` for ``proxy`` (serverAuth) or a client-and-server name."""
    eku = ["serverAuth"] if name == "proxy" else ["serverAuth", "clientAuth"]
    return ca.issue("redis.example", sans=["redis.example", "localhost"], eku=eku)


def redis_admin(node: DemoNode) -> redis.Redis:
    """The node's redis over its unix socket (what the agent uses; no TLS)."""
    return redis.Redis(unix_socket_path=str(node.directory / "redis.sock"), socket_timeout=10)


def redis_tls(cluster: DemoCluster, node: DemoNode) -> redis.Redis:
    """A TLS client of ``node`` presenting the operator's client certificate."""
    cert_file, key_file = cluster.redis_client
    return redis.Redis(
        host="127.0.0.1", port=node.redis_port, ssl=True, ssl_cert_reqs="none",
        ssl_check_hostname=False, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
        socket_timeout=10,
    )  # fmt: skip


def link_up(node: DemoNode) -> bool:
    return bool(redis_admin(node).info("replication").get("master_link_status") == "up")


def trusted_by(node: DemoNode) -> set[str]:
    """The fingerprints of the CAs the node's redis trusts now (its tls-ca-cert-file)."""
    path = Path(redis_admin(node).config_get("tls-ca-cert-file")["tls-ca-cert-file"])
    return {fingerprint(c) for c in x509.load_pem_x509_certificates(path.read_bytes())}


def prove_replication(cluster: DemoCluster, value: str) -> float:
    """Drop every replica's link on the primary (node-1), wait until each replica is linked
    again, then write ``value`` on the primary and read it on every replica, all over TLS.
    Returns the relink time (printed; never asserted)."""
    primary, replicas = cluster.nodes[0], cluster.nodes[1:]
    started = time.monotonic()
    killed = redis_admin(primary).execute_command("CLIENT", "KILL", "TYPE", "replica")
    assert killed == len(replicas)
    for node in replicas:
        wait_until(lambda n=node: link_up(n), timeout=15, interval=0.01, what=f"{node.name} link")
    relinked = time.monotonic() - started
    print(f"  {len(replicas)} replicas relinked in {relinked:.3f} s after CLIENT KILL")
    assert redis_tls(cluster, primary).set("proof", value)
    for node in replicas:
        wait_until(
            lambda n=node: redis_tls(cluster, n).get("proof") == value.encode(),
            timeout=10, interval=0.01, what=f"the write to reach {node.name}",
        )  # fmt: skip
    return relinked
