"""What the OpenAPI document says about request and response bodies.

Routes read their bodies themselves (so that authentication and permission come before body
checks, DESIGN §4.2), which leaves FastAPI nothing to document. These models and helpers put the
bodies back into the document, for clients and for the schemathesis fuzz run that holds every
answer to it; they never change what a route does.

Usage on a route: ``@app.put(path, openapi_extra=request_body(Model), responses=answers(Ok,
400, 401))``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

__all__ = [
    "CertificateAnswer",
    "CertificateDetail",
    "CertificatesAnswer",
    "DeletedAnswer",
    "ErrorBody",
    "EventsAnswer",
    "JoinAnswer",
    "NodeAnswer",
    "NodeOutcomeBody",
    "RotateAnswer",
    "UserBody",
    "ValidateAnswer",
    "answers",
    "request_body",
]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Doc):
    """DESIGN §4.3."""

    error_code: str
    description: str
    message: str
    errors: list[dict[str, Any]] | None = None
    nodes: list[dict[str, Any]] | None = None


class NodeOutcomeBody(_Doc):
    node_id: int
    name: str
    ok: bool
    step: str | None = None
    error: str | None = None
    served_fingerprint: str | list[str] | None = None
    certificates: list[dict[str, Any]] = []


class CertificateAnswer(_Doc):
    name: str
    generation: int
    fingerprint_sha256: str
    not_after: str
    warnings: list[str]
    nodes: list[NodeOutcomeBody]


class CertificateSummary(_Doc):
    name: str
    generation: int
    fingerprint_sha256: str
    not_after: str
    warnings: list[str] = []


class CertificatesAnswer(_Doc):
    certificates: list[CertificateSummary]
    nodes: list[NodeOutcomeBody]


class RotateAnswer(CertificatesAnswer):
    pass


class ValidateAnswer(_Doc):
    valid: bool
    certificates: list[dict[str, Any]]


class DeletedAnswer(_Doc):
    name: str
    deleted: bool
    nodes: list[NodeOutcomeBody]


class EventsAnswer(_Doc):
    total: int
    events: list[dict[str, Any]]


class NodeServed(_Doc):
    node_id: int
    name: str
    generation: int | None
    in_sync: bool
    fingerprint: str | None
    services: list[dict[str, Any]]
    verified_at: str | None


class CertificateDetail(_Doc):
    name: str
    generation: int
    source: str
    subject: str
    issuer: str
    fingerprint_sha256: str
    not_after: str
    updated_at: str
    updated_by: str
    nodes: list[NodeServed]


class NodeAnswer(_Doc):
    uid: int
    name: str
    agent_url: str
    joined_at: str
    in_sync: bool
    certificates: dict[str, dict[str, Any]]


class JoinAnswer(_Doc):
    node_id: int
    certificate: str
    ca_certificate: str
    cluster_name: str


class UserBody(_Doc):
    uid: int
    email: str
    name: str
    role: str
    auth_method: Literal["regular", "certificate"]
    certificate_subject_line: str | None = None


_REASONS = {
    400: "malformed request, or a certificate that may not be installed",
    401: "missing or wrong credentials",
    403: "the role lacks the permission, or the name may not be used this way",
    404: "no such resource (or, on update_cert, an issuer that cannot be found)",
    406: "a certificate of the chain is expired",
    408: "the request body did not arrive in time",
    409: "the cluster was not (fully) updated, or the change conflicts with the current state",
    413: "the body is over 1 MiB",
    415: "the body is not JSON",
}


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with every ``#/$defs/...`` reference replaced by its definition (the models
    here are not recursive), so it can sit in the document without a components entry."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {k: _inline(v, definitions) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, definitions) for v in schema]
    return schema


def request_body(model: Any, *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body shaped like ``model`` (a pydantic
    model, or a union of them)."""
    schema = TypeAdapter(model).json_schema()
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inline(schema, schema.get("$defs", {}))}},
        }
    }


def answers(ok: Any, *errors: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` documenting a 200 shaped like ``ok`` and each error status with
    :class:`ErrorBody`."""
    documented: dict[int | str, dict[str, Any]] = {200: {"model": ok, "description": "OK"}}
    for status in errors:
        documented[status] = {"model": ErrorBody, "description": _REASONS[status]}
    return documented
