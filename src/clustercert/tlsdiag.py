"""Why a TLS connection failed, told so that the operator can fix it.

"Cannot connect" hides three different problems: nothing answers at that address, the server's
certificate does not name the host in the URL, or it is issued by a CA the client does not
trust. :func:`explain` tells them apart from the exception chain (httpx wraps the ``ssl``
error) and, for a name mismatch, lists the names the certificate does carry.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

from cryptography import x509

from clustercert.errors import AgentUnavailable, ClusterCertError, ConfigError
from clustercert.hosts import host_of
from clustercert.pki import subject_alt_names

__all__ = [
    "explain",
    "is_name_mismatch",
    "served_names",
]

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = {62, 64}


def _verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def served_names(url: str, timeout: float = 5.0) -> list[str] | None:
    """The SANs of the certificate served at ``url``'s host and port, from a handshake that
    verifies nothing (it only reads); None if that handshake fails too."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return subject_alt_names(x509.load_der_x509_certificate(der)) if der else None


def is_name_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` is a TLS verification failure because the certificate does not name
    the host the client asked for."""
    failure = _verification_error(exc)
    return failure is not None and failure.verify_code in _NAME_MISMATCH


def explain(
    exc: BaseException, url: str, what: str, *, name_fix: str, ca_fix: str
) -> ClusterCertError:
    """The error to raise when connecting to ``what`` at ``url`` failed with ``exc``, saying
    why and how to fix it: ``name_fix`` for a certificate that does not name the host
    (``{host}`` is replaced), ``ca_fix`` for a certificate from an untrusted CA. Both are
    :class:`ConfigError` (the settings are wrong, retrying will not help); a network failure
    is :class:`AgentUnavailable`."""
    host = host_of(url)
    failure = _verification_error(exc)
    if failure is not None and failure.verify_code in _NAME_MISMATCH:
        names = served_names(url)
        listed = f" (it names: {', '.join(names)})" if names else ""
        return ConfigError(
            f"{what}'s certificate does not name {host}{listed}; "
            f"{name_fix.format(host=host)}, or use a URL with one of the names it carries"
        )
    if failure is not None:
        return ConfigError(
            f"{what} at {url} presented a certificate that cannot be verified "
            f"({failure.verify_message}); {ca_fix}"
        )
    return AgentUnavailable(
        f"cannot reach {what} at {url}: {type(exc).__name__}: {exc or 'no answer'} (is it "
        "running, listening on that address, and is the port open between the two hosts?)"
    )
