"""The one exception tree (DESIGN §4.4).

Every domain failure is a :class:`ClusterCertError`. Each subclass states, as class data, its
``error_code``, the ``http_status`` the API answers with, and the ``exit_code`` the CLI exits
with. One handler in the API and one in the CLI turn these into answers; nothing else chooses a
status code. Programming mistakes stay ``ValueError``/``TypeError``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AgentUnavailable",
    "ApiCertificateUntrusted",
    "ApiUnreachable",
    "BadRequest",
    "CaRotationInProgress",
    "CertificateExpired",
    "CertificateNotFound",
    "CertificateRejected",
    "ChainInvalid",
    "ClusterCertError",
    "ConfigError",
    "EncryptedKey",
    "GenerationMismatch",
    "InsecureSignature",
    "InsufficientPermissions",
    "InvalidCertificate",
    "InvalidJSON",
    "InvalidSchema",
    "IssuerKeyUsage",
    "IssuerNotFound",
    "KeyUsageMismatch",
    "KeyValuesMismatch",
    "LeafIsCA",
    "MethodNotAllowed",
    "MissingExtendedKeyUsage",
    "MissingKey",
    "NodesNotUpdated",
    "NotACA",
    "NotFound",
    "NotRotatable",
    "NotYetValid",
    "PayloadTooLarge",
    "RejectedByTLSClient",
    "RequiredCertificate",
    "StoreConflict",
    "StoreError",
    "Unauthorized",
    "UndeletableUser",
    "UnexpectedKey",
    "UnknownCertificate",
    "UnsupportedMediaType",
    "UpdateInProgress",
    "UserExists",
    "WeakKey",
    "error_for",
]

# CLI exit codes (documented in docs/cli.md): 1 rejected input, 2 usage, 3 authentication or
# permission, 4 cluster not (fully) updated, 5 not found, 6 cannot reach or internal failure.
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_UPDATED = 4
EXIT_NOT_FOUND = 5
EXIT_FAILURE = 6


class ClusterCertError(Exception):
    """Base of every domain failure; carries what the API and the CLI need to answer."""

    error_code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = EXIT_FAILURE

    def __init__(
        self,
        description: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        nodes: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.errors = errors
        self.nodes = nodes

    @property
    def batch_http_status(self) -> int:
        """The status when this error is one item of ``PUT /v1/cluster/certificates``."""
        return self.http_status

    def to_body(self) -> dict[str, Any]:
        """The JSON error body of DESIGN §4.3."""
        body: dict[str, Any] = {
            "error_code": self.error_code,
            "description": self.description,
            "message": self.description,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        if self.nodes is not None:
            body["nodes"] = self.nodes
        return body


# --- 400: malformed requests -------------------------------------------------------------


class BadRequest(ClusterCertError):
    error_code = "bad_request"
    http_status = 400
    exit_code = EXIT_USAGE


class InvalidJSON(BadRequest):
    error_code = "invalid_json"


class InvalidSchema(BadRequest):
    error_code = "invalid_schema"


# --- 400/404/406: certificates that may not be installed -----------------------------------


class CertificateRejected(ClusterCertError):
    """An upload that fails validation (DESIGN §5)."""

    error_code = "invalid_certificate"
    http_status = 400
    exit_code = EXIT_REJECTED


class InvalidCertificate(CertificateRejected):
    error_code = "invalid_certificate"


class KeyValuesMismatch(CertificateRejected):
    error_code = "key_values_mismatch"


class MissingKey(CertificateRejected):
    error_code = "missing_key"


class UnexpectedKey(CertificateRejected):
    error_code = "unexpected_key"


class EncryptedKey(CertificateRejected):
    error_code = "encrypted_key"


class WeakKey(CertificateRejected):
    error_code = "weak_key"


class InsecureSignature(CertificateRejected):
    error_code = "insecure_signature"


class NotYetValid(CertificateRejected):
    error_code = "not_yet_valid"


class ChainInvalid(CertificateRejected):
    error_code = "chain_invalid"


class LeafIsCA(CertificateRejected):
    error_code = "leaf_is_ca"


class NotACA(CertificateRejected):
    error_code = "not_a_ca"


class MissingExtendedKeyUsage(CertificateRejected):
    error_code = "missing_extended_key_usage"


class IssuerNotFound(CertificateRejected):
    """No issuer for some certificate of the chain: 404 on update_cert, 400 in a batch."""

    error_code = "issuer_not_found"
    http_status = 404

    @property
    def batch_http_status(self) -> int:
        return 400


class CertificateExpired(CertificateRejected):
    error_code = "certificate_expired"
    http_status = 406


class KeyUsageMismatch(CertificateRejected):
    """The leaf's keyUsage does not allow what its name's extendedKeyUsage needs (RFC 5280)."""

    error_code = "key_usage_mismatch"


class IssuerKeyUsage(CertificateRejected):
    """A CA of the chain has a keyUsage extension without keyCertSign."""

    error_code = "issuer_key_usage"


class RejectedByTLSClient(CertificateRejected):
    """A real TLS handshake (OpenSSL) refused the upload as a client of its name would."""

    error_code = "rejected_by_tls_client"


# --- 401/403: who may do what --------------------------------------------------------------


class Unauthorized(ClusterCertError):
    error_code = "unauthorized"
    http_status = 401
    exit_code = EXIT_AUTH


class InsufficientPermissions(ClusterCertError):
    error_code = "insufficient_permissions"
    http_status = 403
    exit_code = EXIT_AUTH


class UnknownCertificate(ClusterCertError):
    error_code = "unknown_certificate"
    http_status = 403
    exit_code = EXIT_REJECTED


class RequiredCertificate(ClusterCertError):
    error_code = "required_certificate"
    http_status = 403
    exit_code = EXIT_REJECTED


class UserExists(ClusterCertError):
    error_code = "user_exists"
    http_status = 409
    exit_code = EXIT_REJECTED


class UndeletableUser(ClusterCertError):
    """Deleting this user would lock the cluster out (the last admin) or the caller out."""

    error_code = "undeletable_user"
    http_status = 409
    exit_code = EXIT_REJECTED


class NotRotatable(ClusterCertError):
    error_code = "not_rotatable"
    http_status = 403
    exit_code = EXIT_REJECTED


# --- 404/405/413/415 -----------------------------------------------------------------------


class NotFound(ClusterCertError):
    error_code = "not_found"
    http_status = 404
    exit_code = EXIT_NOT_FOUND


class CertificateNotFound(NotFound):
    error_code = "certificate_not_found"


class MethodNotAllowed(ClusterCertError):
    error_code = "method_not_allowed"
    http_status = 405
    exit_code = EXIT_USAGE


class PayloadTooLarge(ClusterCertError):
    error_code = "payload_too_large"
    http_status = 413
    exit_code = EXIT_REJECTED


class UnsupportedMediaType(ClusterCertError):
    error_code = "unsupported_media_type"
    http_status = 415
    exit_code = EXIT_USAGE


# --- 409: the cluster did not (fully) change -----------------------------------------------


class NodesNotUpdated(ClusterCertError):
    """Some node did not do its part. ``step`` says where the rollout stopped and ``changed``
    whether the request took effect: ``trust`` (a new root could not be pinned on every node:
    aborted, nothing changed), ``stage`` (aborted, nothing changed), ``commit`` (decided:
    the certificate is desired and lagging nodes converge by themselves), ``remove`` (deleted
    from the store; nodes that still hold the files are cleaned by the reconciler)."""

    error_code = "nodes_not_updated"
    http_status = 409
    exit_code = EXIT_NOT_UPDATED

    def __init__(
        self,
        description: str,
        *,
        step: str | None = None,
        nodes: list[dict[str, Any]] | None = None,
    ) -> None:
        # step is None only where an answer is rebuilt without one (error_for): nothing known.
        super().__init__(description, nodes=nodes)
        self.step = step
        self.changed = step in ("commit", "remove")

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self.step is not None:
            body |= {"step": self.step, "changed": self.changed}
        return body


class GenerationMismatch(ClusterCertError):
    """The certificate moved since the caller read it (``expected_generation`` / ``If-Match``)."""

    error_code = "generation_mismatch"
    http_status = 409
    exit_code = EXIT_NOT_UPDATED


class UpdateInProgress(ClusterCertError):
    error_code = "update_in_progress"
    http_status = 409
    exit_code = EXIT_NOT_UPDATED


class CaRotationInProgress(ClusterCertError):
    """``POST /v1/cluster/ca/rotate`` while a rotation of the internal CA is not finished."""

    error_code = "ca_rotation_in_progress"
    http_status = 409
    exit_code = EXIT_NOT_UPDATED


# --- infrastructure --------------------------------------------------------------------------


class StoreError(ClusterCertError):
    """The state store failed; the message names the backend and what it was doing."""

    error_code = "store_unavailable"
    http_status = 503


class StoreConflict(StoreError):
    """A compare-and-set lost against a concurrent writer."""

    error_code = "store_conflict"
    http_status = 409
    exit_code = EXIT_NOT_UPDATED


class AgentUnavailable(ClusterCertError):
    """A node agent could not be reached or answered with an error."""

    error_code = "agent_unavailable"
    http_status = 502


class ApiUnreachable(ClusterCertError):
    """The CLI could not connect to the control plane's API (client side only)."""

    error_code = "api_unreachable"
    http_status = 502


class ApiCertificateUntrusted(ClusterCertError):
    """The CLI could not verify the API's certificate (client side only)."""

    error_code = "api_certificate_untrusted"
    http_status = 502


class ConfigError(ClusterCertError):
    """A configuration file or cluster directory is missing or malformed."""

    error_code = "invalid_configuration"
    http_status = 500
    exit_code = EXIT_USAGE


def error_for(error_code: str, description: str) -> ClusterCertError:
    """Rebuild the error an API answer describes (the CLI's client side of DESIGN §4.3)."""
    stack: list[type[ClusterCertError]] = [ClusterCertError]
    while stack:
        cls = stack.pop()
        if cls.error_code == error_code:
            return cls(description)
        stack.extend(cls.__subclasses__())
    error = ClusterCertError(description)
    error.error_code = error_code  # type: ignore[misc]
    return error
