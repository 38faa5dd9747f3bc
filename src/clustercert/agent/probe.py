"""Prove what a service serves: a TLS handshake and the SHA-256 of the leaf it presents."""

from __future__ import annotations

import asyncio
import functools
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


@functools.lru_cache(maxsize=32)
def _verifying_context(anchors_pem: str) -> ssl.SSLContext:
    """A client as strict as the service's clients: it trusts ``anchors_pem`` (and the system
    CAs) and checks the chain and the serverAuth purpose; not the host name (the agent reaches
    the service by its bind address, which the certificate need not name)."""
    ctx = ssl.create_default_context(cadata=anchors_pem)
    ctx.check_hostname = False
    return ctx


def _served_fingerprint_blocking(
    host: str, port: int, server_name: str | None, timeout: float, anchors_pem: str | None = None
) -> str:
    context = _verifying_context(anchors_pem) if anchors_pem else _CONTEXT
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name or None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return hashlib.sha256(der).hexdigest()


async def served_fingerprint(
    host: str,
    port: int,
    server_name: str | None,
    timeout: float = 5.0,
    anchors_pem: str | None = None,
) -> str:
    """Handshake with ``host:port`` (with SNI ``server_name`` when given) and return the SHA-256
    of the served leaf certificate. Raises ``OSError``/``ssl.SSLError``/``TimeoutError``.

    The handshake runs on a blocking socket in a worker thread: OpenSSL then drives it in C,
    which costs a fraction of the CPU of asyncio's SSL protocol. The socket timeout bounds it.
    With ``anchors_pem`` the handshake verifies the served chain against those roots (raising
    ``ssl.SSLCertVerificationError`` when a client trusting them would refuse it)."""
    return await asyncio.to_thread(
        _served_fingerprint_blocking, host, port, server_name, timeout, anchors_pem
    )


async def _attempt(
    host: str, port: int, server_name: str | None, timeout: float, anchors_pem: str | None = None
) -> str | BaseException:
    """:func:`served_fingerprint`, with its exception returned rather than raised."""
    try:
        return await served_fingerprint(host, port, server_name, timeout, anchors_pem)
    except Exception as exc:  # sorted out by the caller, as with gather(return_exceptions)
        return exc


@dataclass(frozen=True)
class ProbeResult:
    address: str
    served: str | None
    ok: bool
    error: str | None = None
    verified: bool | None = None  # a verifying handshake succeeded (None: none was made)


async def probe(
    host: str,
    port: int,
    expected: str,
    sni: str,
    timeout: float = 5.0,
    anchors_pem: str | None = None,
    without_sni: bool = True,
) -> ProbeResult:
    """Handshake without SNI and with SNI ``sni``; ok when both serve ``expected``. With
    ``anchors_pem`` (the roots the certificate's clients trust) the handshake with SNI is a
    verifying one, as a client's would be: ok also requires that it verifies.

    ``without_sni=False`` skips the handshake without SNI, for a server that cannot choose its
    certificate by SNI (redis-server: one ``tls-cert-file`` whatever the client sends), where
    it would prove nothing the other one does not (docs/decisions.md, "One handshake for
    redis")."""
    address = f"{host}:{port}"
    if without_sni:
        # Both handshakes at once (each in its own worker thread): the wall time of one.
        plain, verifying = await asyncio.gather(
            served_fingerprint(host, port, None, timeout),
            served_fingerprint(host, port, sni, timeout, anchors_pem),
            return_exceptions=True,
        )
        shown: tuple[tuple[str | None, str | BaseException], ...] = (
            (None, plain),
            (sni, verifying),
        )
    else:
        plain = verifying = await _attempt(host, port, sni, timeout, anchors_pem)
        if isinstance(verifying, ssl.SSLCertVerificationError):
            # Refused: is it the old certificate, still served, or the new one? Only a failed
            # proof pays for this second handshake.
            plain = await _attempt(host, port, sni, timeout)
        shown = ((sni, plain),)
    # What is served decides first: a service still serving the old certificate says so,
    # whether or not a verifying client would accept that old one.
    for server_name, answer in shown:
        if isinstance(answer, str) and answer != expected:
            with_sni = f"with SNI {server_name!r}" if server_name else "without SNI"
            error = f"{address} still serves {answer[:16]}… {with_sni}, expected {expected[:16]}…"
            return ProbeResult(address, answer, False, error)
    served = plain if isinstance(plain, str) else None
    if isinstance(verifying, ssl.SSLCertVerificationError):
        error = (
            f"{address} serves a chain that a verifying client refuses: "
            f"{verifying.verify_message or verifying.reason}"
        )
        return ProbeResult(address, served, False, error, verified=False)
    for failure in (plain, verifying):
        if isinstance(failure, BaseException):
            if not isinstance(failure, (OSError, ssl.SSLError, TimeoutError)):
                raise failure
            error = f"handshake with {address} failed: {failure!r}"
            return ProbeResult(address, served, False, error)
    return ProbeResult(address, served, True, verified=True if anchors_pem else None)
