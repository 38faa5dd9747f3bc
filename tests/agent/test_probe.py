"""The proof after a commit (agent/probe.py): real TLS servers on loopback, real handshakes.

A served certificate can match the expected fingerprint and still be refused by every client
that verifies (issue #11): the proof's verifying handshake tells the two apart.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certfactory import CA, Leaf

from clustercert.agent.probe import probe


@contextmanager
def serving(leaf: Leaf, tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting ``leaf`` (and its chain) until the block ends;
    every connection is handshaken and closed. Bounded: it stops with the block."""
    (tmp_path / "cert.pem").write_text(leaf.chain_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with context.wrap_socket(raw, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                raw.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_certificate_clients_accept_is_proven_by_a_verifying_handshake(tmp_path: Path) -> None:
    ca = CA.new()
    leaf = ca.issue("redis.example")
    with serving(leaf, tmp_path) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, ca.cert_pem)
        )
    assert (result.ok, result.verified, result.served) == (True, True, leaf.fingerprint)


def test_the_right_fingerprint_that_clients_refuse_fails_the_proof(tmp_path: Path) -> None:
    ca = CA.new()
    # Served as expected, but its keyUsage forbids a TLS server's signature.
    leaf = ca.issue("redis.example", key_usage=["nonRepudiation"])
    with serving(leaf, tmp_path) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, ca.cert_pem)
        )
        unverified = asyncio.run(probe("127.0.0.1", port, leaf.fingerprint, "redis.example"))
    assert (result.ok, result.verified) == (False, False)
    assert result.error is not None and "a verifying client refuses" in result.error
    assert "unsuitable certificate purpose" in result.error
    # Without roots only the fingerprint is compared (what the proof was before issue #11).
    assert (unverified.ok, unverified.verified) == (True, None)


def test_a_chain_from_another_root_fails_the_proof(tmp_path: Path) -> None:
    leaf = CA.new().issue("redis.example")
    with serving(leaf, tmp_path) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, CA.new().cert_pem)
        )
    assert (result.ok, result.verified) == (False, False)
    assert result.error is not None and "unable to get local issuer certificate" in result.error
