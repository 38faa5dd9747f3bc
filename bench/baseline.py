"""The baselines: each node's work done by a bare script, in parallel (the floor) and node by node.

A node's work is what the agent must do at the least to switch redis to a new certificate:

1. write the certificate chain and the key to new files (mode 0600, ``fsync``),
2. one ``CONFIG SET tls-cert-file X tls-key-file Y`` over the node's redis unix socket,
3. one TLS handshake to the redis TLS port, comparing the served leaf's SHA-256 with the new one.

It runs against the same redis-servers as the rotations it is compared with.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.certs import LeafPair

__all__ = ["BaselineFailed", "Baselines", "NodeTarget"]

_TIMEOUT = 10.0


class BaselineFailed(Exception):
    """A baseline step failed; the message names the node and the step."""


@dataclass(frozen=True)
class NodeTarget:
    """Where one node's work goes: its directory, redis unix socket and TLS port."""

    name: str
    directory: Path
    socket: Path
    tls_port: int


def _probe_context() -> ssl.SSLContext:
    # Like the agent's probe: the fingerprint is the proof, whoever issued the certificate.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _resp(*args: str) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Baselines:
    """Runs one node's work on every node: in parallel (threads, one per node) or in sequence."""

    def __init__(self, nodes: Sequence[NodeTarget]) -> None:
        self.nodes = list(nodes)
        self._context = _probe_context()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.nodes)))
        self._serial = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def node_work(self, node: NodeTarget, tag: str, leaf: LeafPair) -> None:
        """Write, CONFIG SET, verify by handshake. Raises BaselineFailed."""
        directory = node.directory / "bench-baseline"
        directory.mkdir(mode=0o700, exist_ok=True)
        cert, key = directory / f"{tag}.cert.pem", directory / f"{tag}.key.pem"
        _write_durably(cert, leaf.chain_pem.encode())
        _write_durably(key, leaf.key_pem.encode())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(_TIMEOUT)
                sock.connect(str(node.socket))
                sock.sendall(_resp("CONFIG", "SET", "tls-cert-file", str(cert),
                                   "tls-key-file", str(key)))  # fmt: skip
                reply = sock.recv(4096)
        except OSError as exc:
            raise BaselineFailed(f"{node.name}: CONFIG SET failed: {exc!r}") from exc
        if not reply.startswith(b"+OK"):
            raise BaselineFailed(f"{node.name}: CONFIG SET answered {reply[:200]!r}")
        try:
            with (
                socket.create_connection(("127.0.0.1", node.tls_port), timeout=_TIMEOUT) as raw,
                self._context.wrap_socket(raw) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            raise BaselineFailed(f"{node.name}: handshake failed: {exc!r}") from exc
        served = hashlib.sha256(der or b"").hexdigest()
        if served != leaf.fingerprint:
            raise BaselineFailed(f"{node.name}: serves {served[:16]}…, expected the new leaf")

    def _tag(self, mode: str) -> str:
        self._serial += 1
        return f"{mode}-{self._serial}"

    def floor(self, leaf: LeafPair) -> None:
        """Every node's work at once, one thread per node."""
        tag = self._tag("floor")
        futures = [self._pool.submit(self.node_work, n, tag, leaf) for n in self.nodes]
        for future in futures:
            future.result()

    def node_by_node(self, leaf: LeafPair) -> None:
        """Every node's work, one node after the other."""
        tag = self._tag("serial")
        for node in self.nodes:
            self.node_work(node, tag, leaf)
