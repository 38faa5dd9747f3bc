"""TLS contexts shared by the control plane and the agents.

Servers own their ``SSLContext`` instead of letting uvicorn build one, so that a certificate can
be replaced without a restart: :class:`ReloadableServerContext` hands uvicorn one *base* context
whose SNI callback (called for every ClientHello, with or without SNI) points each new handshake at
the newest context. Connections already open keep the context they were made with.

Client certificates: OpenSSL takes the *verify mode* from the base context when a connection
starts, but verifies against the *trust store* of the context the SNI callback selects. So a
listener that may ever accept client certificates asks for them from the start
(``request_client_cert``: ``CERT_OPTIONAL``) and :meth:`ReloadableServerContext.set_client_ca`
swaps the trusted bundle for new handshakes. A client that presents a certificate no trusted CA
issued fails the handshake (stdlib ``ssl`` offers no "ask but do not verify" mode); a client
that presents none is unaffected.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path
from typing import Any

__all__ = ["ReloadableServerContext", "client_context", "expose_peer_certificate", "server_context"]


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    client_ca: Path | None = None,
    require_client: bool = False,
    client_ca_pem: str | None = None,
    request_client_cert: bool = False,
) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context; with ``client_ca`` (a file) or ``client_ca_pem`` (a bundle),
    client certificates are checked against it (required when ``require_client``, optional
    otherwise). OpenSSL then also checks that a client certificate allows clientAuth.
    ``request_client_cert`` asks for an optional client certificate even with no CA loaded yet.
    Every certificate of ``client_ca_pem`` is a trust anchor (intermediates included)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if client_ca is not None or client_ca_pem or request_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (system roots when None), optionally
    presenting a client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class ReloadableServerContext:
    """A server context whose certificate (and trusted client CAs) can be swapped for new
    handshakes.

    ``reload`` and ``set_client_ca`` build the new context fully before swapping, so a bad pair
    or bundle raises (``ssl.SSLError``/``OSError``) and leaves what is served unchanged.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        client_ca: Path | None = None,
        require_client: bool = False,
        request_client_cert: bool = False,
        client_ca_pem: str | None = None,
    ) -> None:
        self._client_ca = client_ca
        self._require_client = require_client
        self._request_client_cert = request_client_cert
        self._client_ca_pem = client_ca_pem
        self._files = (cert_file, key_file)
        self._lock = threading.Lock()
        self._current = self._build(cert_file, key_file, client_ca_pem)
        self.base = self._build(cert_file, key_file, client_ca_pem)
        self.base.sni_callback = self._select

    @property
    def client_ca_pem(self) -> str | None:
        """The bundle new handshakes verify client certificates against."""
        return self._client_ca_pem

    def _build(self, cert_file: Path, key_file: Path, client_ca_pem: str | None) -> ssl.SSLContext:
        return server_context(
            cert_file,
            key_file,
            client_ca=self._client_ca,
            require_client=self._require_client,
            client_ca_pem=client_ca_pem,
            request_client_cert=self._request_client_cert,
        )

    def _select(
        self, conn: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, base: ssl.SSLContext
    ) -> None:
        conn.context = self._current

    def reload(self, cert_file: Path, key_file: Path) -> None:
        with self._lock:
            new = self._build(cert_file, key_file, self._client_ca_pem)
            self._current, self._files = new, (cert_file, key_file)

    def set_client_ca(self, pem: str | None) -> None:
        """Trust ``pem`` (a bundle of CA certificates; None: none) for client certificates in new
        handshakes. Only meaningful with ``request_client_cert``."""
        with self._lock:
            new = self._build(*self._files, pem)
            self._current, self._client_ca_pem = new, pem


def expose_peer_certificate(protocol: Any, transport: asyncio.Transport) -> None:
    """Show the ASGI app of a uvicorn protocol (call from ``connection_made``) the TLS peer's
    certificate, which uvicorn does not: ``scope["extensions"]["tls"]["client_cert_chain"]``
    (PEM, leaf only: Python 3.11's ``ssl`` exposes no verified chain)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return
    der = ssl_object.getpeercert(binary_form=True)
    tls = {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }
    app = protocol.app

    async def with_tls(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = tls
        await app(scope, receive, send)

    protocol.app = with_tls
