"""TLS contexts shared by the control plane and the agents.

Servers own their ``SSLContext`` instead of letting uvicorn build one, so that a certificate can
be replaced without a restart: :class:`ReloadableServerContext` hands uvicorn one *base* context
whose SNI callback (called for every ClientHello, with or without SNI) points each new handshake at
the newest context. Connections already open keep the context they were made with.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

__all__ = ["ReloadableServerContext", "client_context", "server_context"]


def server_context(
    cert_file: Path, key_file: Path, *, client_ca: Path | None = None, require_client: bool = False
) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context; with ``client_ca``, client certificates are checked against it
    (required when ``require_client``, optional otherwise). OpenSSL then also checks that a client
    certificate allows clientAuth."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
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
    """A server context whose certificate can be swapped for new handshakes.

    ``reload`` builds the new context fully before swapping, so a bad pair raises
    (``ssl.SSLError``/``OSError``) and leaves the served certificate unchanged.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        client_ca: Path | None = None,
        require_client: bool = False,
    ) -> None:
        self._client_ca = client_ca
        self._require_client = require_client
        self._lock = threading.Lock()
        self._current = self._build(cert_file, key_file)
        self.base = self._build(cert_file, key_file)
        self.base.sni_callback = self._select

    def _build(self, cert_file: Path, key_file: Path) -> ssl.SSLContext:
        return server_context(
            cert_file, key_file, client_ca=self._client_ca, require_client=self._require_client
        )

    def _select(
        self, conn: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, base: ssl.SSLContext
    ) -> None:
        conn.context = self._current

    def reload(self, cert_file: Path, key_file: Path) -> None:
        new = self._build(cert_file, key_file)
        with self._lock:
            self._current = new
