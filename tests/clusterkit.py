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
from certfactory import CA

from clustercert.demo import DemoCluster

__all__ = ["api", "desired_fingerprints", "served_by_node", "served_fingerprint", "wait_until"]


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


def put(cluster: DemoCluster, body: dict[str, str]) -> httpx.Response:
    """PUT /v1/cluster/update_cert as admin."""
    with api(cluster) as client:
        return client.put("/v1/cluster/update_cert", json=body)


def thaw(cluster: DemoCluster) -> None:
    """SIGCONT every running agent, so a test that froze one never leaves it stopped."""
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGCONT)
