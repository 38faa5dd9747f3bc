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
def serving(leaf: Leaf, tmp_path: Path, seen: list[str | None] | None = None) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting ``leaf`` (and its chain) until the block ends;
    every connection is handshaken and closed (its SNI appended to ``seen``). Bounded: it
    stops with the block."""
    (tmp_path / "cert.pem").write_text(leaf.chain_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    if seen is not None:
        context.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[func-returns-value]
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


def test_one_verifying_handshake_for_a_server_that_ignores_sni(tmp_path: Path) -> None:
    """``without_sni=False`` (redis-server, which serves one certificate whatever the SNI):
    the proof is one verifying handshake with SNI, not two."""
    ca = CA.new()
    leaf = ca.issue("redis.example")
    seen: list[str | None] = []
    with serving(leaf, tmp_path, seen) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, ca.cert_pem,
                  without_sni=False)
        )  # fmt: skip
        both = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, ca.cert_pem)
        )
    assert (result.ok, result.verified, result.served) == (True, True, leaf.fingerprint)
    assert both.ok
    assert sorted(seen, key=str) == sorted(["redis.example", None, "redis.example"], key=str)


def test_one_handshake_still_says_the_old_certificate_is_served(tmp_path: Path) -> None:
    """With one handshake, a refused chain is told apart: the old certificate still served
    (from a CA the new roots do not hold) is reported as such, not as a refused chain."""
    old = CA.new().issue("redis.example")
    new_ca = CA.new()
    expected = new_ca.issue("redis.example").fingerprint
    with serving(old, tmp_path) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, expected, "redis.example", 5.0, new_ca.cert_pem,
                  without_sni=False)
        )  # fmt: skip
    assert (result.ok, result.served) == (False, old.fingerprint)
    assert result.error is not None and "still serves" in result.error
    assert "with SNI 'redis.example'" in result.error


def test_one_handshake_refused_for_the_right_certificate_fails_the_proof(tmp_path: Path) -> None:
    ca = CA.new()
    leaf = ca.issue("redis.example", key_usage=["nonRepudiation"])
    with serving(leaf, tmp_path) as port:
        result = asyncio.run(
            probe("127.0.0.1", port, leaf.fingerprint, "redis.example", 5.0, ca.cert_pem,
                  without_sni=False)
        )  # fmt: skip
    assert (result.ok, result.verified, result.served) == (False, False, leaf.fingerprint)
    assert result.error is not None and "a verifying client refuses" in result.error
