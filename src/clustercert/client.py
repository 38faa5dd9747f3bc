"""The API client behind the CLI's remote commands.

Connection settings come from options, then ``CLUSTERCERT_URL``/``_USER``/``_PASSWORD``/
``_CA_FILE``, then a ``cluster.json`` written by ``clustercert demo``. Error answers become
the same exceptions the server raised (:func:`clustercert.errors.error_for`).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from clustercert.errors import (
    ApiCertificateUntrusted,
    ApiUnreachable,
    ClusterCertError,
    ConfigError,
    NodesNotUpdated,
    error_for,
)
from clustercert.tlsdiag import explain, is_name_mismatch

__all__ = ["ApiClient", "Connection"]


@dataclass(frozen=True)
class Connection:
    url: str
    user: str
    password: str
    ca_file: Path | None

    @classmethod
    def resolve(
        cls,
        url: str | None,
        user: str | None,
        password: str | None,
        ca_file: str | None,
        cluster_file: str | None,
    ) -> Connection:
        """Options first (click has already folded in the environment), then cluster.json."""
        if cluster_file:
            path = Path(cluster_file)
            if path.is_dir():
                path = path / "cluster.json"
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read cluster file {path}: {exc}") from exc
            url = url or info.get("api_url")
            user = user or info.get("username")
            password = password or info.get("password")
            ca_file = ca_file or info.get("ca_file")
        missing = [
            n for n, v in (("--url", url), ("--user", user), ("--password", password)) if not v
        ]
        if missing:
            raise ConfigError(
                f"missing {', '.join(missing)}: pass them, set CLUSTERCERT_URL/_USER/_PASSWORD, "
                "or give --cluster-file DIR/cluster.json"
            )
        assert url and user and password
        return cls(url.rstrip("/"), user, password, Path(ca_file) if ca_file else None)


class ApiClient:
    def __init__(self, connection: Connection, timeout: float = 120.0) -> None:
        verify = ssl.create_default_context(
            cafile=str(connection.ca_file) if connection.ca_file else None
        )
        self._http = httpx.Client(
            base_url=connection.url,
            auth=(connection.user, connection.password),
            verify=verify,
            timeout=timeout,
        )
        self.url = connection.url
        self.connection = connection

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.ConnectError as exc:
            raise _connect_error(self.url, exc) from exc
        except httpx.HTTPError as exc:
            raise ApiUnreachable(f"no answer from {self.url}: {exc or type(exc).__name__}") from exc
        try:
            answer = response.json()
        except ValueError:
            answer = {"description": response.text[:300]}
        if response.status_code >= 400:
            description = str(answer.get("description") or answer)
            error = error_for(str(answer.get("error_code")), description)
            error.errors = answer.get("errors")
            error.nodes = answer.get("nodes")
            if isinstance(error, NodesNotUpdated):
                error.step, error.changed = answer.get("step"), bool(answer.get("changed"))
            raise error
        return answer


def _connect_error(url: str, exc: httpx.ConnectError) -> ClusterCertError:
    """What a failed connection means to an operator: nobody listens, or the API's certificate
    is not one the CLI can verify (then the fix is --ca-file), or does not name the host in the
    URL (then the fix is a name it carries, or --advertise / --san)."""
    if is_name_mismatch(exc):
        return explain(
            exc, url, "the API",
            name_fix="start the control plane with `clustercert server --advertise "
            "{host}` (a new cluster: `clustercert init --san {host}`)",
            ca_fix="pass the cluster's CA with --ca-file DIR/ca.pem (or CLUSTERCERT_CA_FILE)",
        )  # fmt: skip
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        reason = cause.verify_message if isinstance(cause, ssl.SSLCertVerificationError) else exc
        return ApiCertificateUntrusted(
            f"cannot verify the certificate of {url}: {reason}; pass the CA that issued it with "
            "--ca-file (or CLUSTERCERT_CA_FILE), e.g. the cluster directory's ca.pem"
        )
    text = str(exc)
    reason = "connection refused" if "refused" in text.lower() else text or "connection failed"
    return ApiUnreachable(f"cannot connect to {url}: {reason}")
