"""How a joining agent comes to trust the control plane: a CA file, or the CA pinned by the
join token (:mod:`clustercert.jointoken`), fetched and checked before the token is sent."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from clustercert.agent.config import AgentConfig
from clustercert.certfiles import write_atomically
from clustercert.errors import AgentUnavailable, ClusterCertError, ConfigError
from clustercert.jointoken import JoinToken
from clustercert.tlsdiag import explain

__all__ = ["CA_PATH", "control_plane_context", "explain_join_failure"]

CA_PATH = "/v1/internal/ca"


def explain_join_failure(exc: BaseException, url: str) -> ClusterCertError:
    return explain(
        exc, url, "the control plane",
        name_fix="start the control plane with `clustercert server --advertise {host}` (a new "
        "cluster: `clustercert init --san {host}`)",
        ca_fix="use a join token printed by this cluster's `clustercert join-token` (it pins "
        "the CA), or set ca_file to the cluster's ca.pem",
    )  # fmt: skip


def _fetch_pinned_ca(url: str, token: JoinToken, timeout: float) -> x509.Certificate:
    """The CA the control plane serves at ``CA_PATH``, read over TLS that verifies nothing yet
    (nothing secret is sent) and kept only if it matches the token's pin."""
    try:
        response = httpx.get(url + CA_PATH, verify=False, timeout=timeout)  # noqa: S501
    except httpx.HTTPError as exc:
        raise explain_join_failure(exc, url) from exc
    if response.status_code != 200:
        raise AgentUnavailable(
            f"the control plane at {url} did not serve its CA ({response.status_code} from "
            f"{CA_PATH}): {response.text[:200]}"
        )
    try:
        ca = x509.load_pem_x509_certificate(response.json()["ca_certificate"].encode())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AgentUnavailable(
            f'{url}{CA_PATH} did not answer {{"ca_certificate": PEM}}: {response.text[:200]}'
        ) from exc
    token.check(ca)
    return ca


def control_plane_context(
    config: AgentConfig, token: JoinToken, ca_file: Path, timeout: float = 30.0
) -> ssl.SSLContext:
    """A client context that trusts the cluster CA for the join: ``ca_file`` from the
    configuration, or the pinned CA, then written to ``ca_file`` (0644, atomically) so the
    node keeps what it verified."""
    if config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.ca_file))
    if token.ca_hash is None:
        raise ConfigError(
            "ca_file: required when join_token carries no CA pin; use the whole token "
            "`clustercert join-token` prints (SECRET.sha256:HEX), or set ca_file to the "
            "cluster's ca.pem"
        )
    ca = _fetch_pinned_ca(config.control_plane_url, token, timeout)
    pem = ca.public_bytes(Encoding.PEM)
    ca_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(ca_file, pem, 0o644)
    return ssl.create_default_context(cadata=pem.decode())
