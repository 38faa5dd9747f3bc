"""Prove what a service serves: a TLS handshake and the SHA-256 of the leaf it presents."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from dataclasses import dataclass

__all__ = ["ProbeResult", "probe", "served_fingerprint"]


def _probe_context() -> ssl.SSLContext:
    # We compare fingerprints, so we need the certificate whatever its issuer or names.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_CONTEXT = _probe_context()


def _served_fingerprint_blocking(
    host: str, port: int, server_name: str | None, timeout: float
) -> str:
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        _CONTEXT.wrap_socket(raw, server_hostname=server_name or None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return hashlib.sha256(der).hexdigest()


async def served_fingerprint(
    host: str, port: int, server_name: str | None, timeout: float = 5.0
) -> str:
    """Handshake with ``host:port`` (with SNI ``server_name`` when given) and return the SHA-256
    of the served leaf certificate. Raises ``OSError``/``ssl.SSLError``/``TimeoutError``.

    The handshake runs on a blocking socket in a worker thread: OpenSSL then drives it in C,
    which costs a fraction of the CPU of asyncio's SSL protocol. The socket timeout bounds it."""
    return await asyncio.to_thread(_served_fingerprint_blocking, host, port, server_name, timeout)


@dataclass(frozen=True)
class ProbeResult:
    address: str
    served: str | None
    ok: bool
    error: str | None = None


async def probe(host: str, port: int, expected: str, sni: str, timeout: float = 5.0) -> ProbeResult:
    """Handshake without SNI and with SNI ``sni``; ok when both serve ``expected``."""
    address = f"{host}:{port}"
    served: str | None = None
    try:
        # Both handshakes at once (each in its own worker thread): the wall time of one.
        names = (None, sni)
        both = await asyncio.gather(*(served_fingerprint(host, port, n, timeout) for n in names))
        for server_name, served in zip(names, both, strict=True):
            if served != expected:
                with_sni = f"with SNI {server_name!r}" if server_name else "without SNI"
                return ProbeResult(
                    address,
                    served,
                    False,
                    f"{address} still serves {served[:16]}… {with_sni}, expected {expected[:16]}…",
                )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return ProbeResult(address, served, False, f"handshake with {address} failed: {exc!r}")
    return ProbeResult(address, served, True)
