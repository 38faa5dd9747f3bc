"""Prove what a service serves: a TLS handshake and the SHA-256 of the leaf it presents."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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


async def served_fingerprint(
    host: str, port: int, server_name: str | None, timeout: float = 5.0
) -> str:
    """Handshake with ``host:port`` (with SNI ``server_name`` when given) and return the SHA-256
    of the served leaf certificate. Raises ``OSError``/``ssl.SSLError``/``TimeoutError``."""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=_CONTEXT, server_hostname=server_name or None),
        timeout,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            raise ssl.SSLError("the server presented no certificate")
        return hashlib.sha256(der).hexdigest()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout)


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
        for server_name in (None, sni):
            served = await served_fingerprint(host, port, server_name, timeout)
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
