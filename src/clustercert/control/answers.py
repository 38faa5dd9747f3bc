"""The API's success bodies, and what the OpenAPI document says about bodies.

Each model here IS a route's answer: the route builds it and FastAPI serialises it (its return
annotation), except the rollout answers, which :func:`rollout_answer` dumps once (below). The
same models document the answers, for clients and for the schemathesis fuzz run that holds
every answer to the document. Routes read their request bodies themselves (so authentication
and permission come first, DESIGN §4.2), so :func:`request_body` puts those into the document.

Usage on a route: ``@router.put(path, openapi_extra=request_body(Model), responses=answers(Ok,
400, 401))``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter

from clustercert.control.state import User

__all__ = [
    "CaAnswer",
    "CertificateAnswer",
    "CertificateDetail",
    "CertificatesAnswer",
    "DeletedAnswer",
    "ErrorBody",
    "EventsAnswer",
    "JoinAnswer",
    "NodeAnswer",
    "NodeOutcomeBody",
    "RemovedNodeAnswer",
    "RotateAnswer",
    "RotatedCertificate",
    "UserBody",
    "ValidateAnswer",
    "answers",
    "request_body",
    "rollout_answer",
]


class _Answer(BaseModel):
    # Extra fields pass through (node outcomes come from control/rollout.py as they are) and
    # the document tells clients to tolerate additions.
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Answer):
    """DESIGN §4.3."""

    error_code: str
    description: str
    message: str
    errors: list[dict[str, Any]] | None = None
    nodes: list[dict[str, Any]] | None = None
    # nodes_not_updated only: where the rollout stopped (stage, commit, remove) and whether the
    # request took effect (docs/api.md).
    step: str | None = None
    changed: bool | None = None


class NodeOutcomeBody(_Answer):
    node_id: int
    name: str
    ok: bool
    step: str | None = None
    error: str | None = None
    served_fingerprint: str | list[str] | None = None
    certificates: list[dict[str, Any]] = []


class RotatedCertificate(_Answer):
    name: str
    generation: int
    fingerprint_sha256: str
    not_after: str


class CertificateSummary(RotatedCertificate):
    warnings: list[str]


class CertificateAnswer(CertificateSummary):
    nodes: list[NodeOutcomeBody]


class CertificatesAnswer(_Answer):
    certificates: list[CertificateSummary]
    nodes: list[NodeOutcomeBody]


class RotateAnswer(_Answer):
    certificates: list[RotatedCertificate]
    nodes: list[NodeOutcomeBody]


class ValidateAnswer(_Answer):
    valid: bool
    certificates: list[dict[str, Any]]


class DeletedAnswer(_Answer):
    name: str
    deleted: bool
    nodes: list[NodeOutcomeBody]


class EventsAnswer(_Answer):
    total: int
    events: list[dict[str, Any]]


class NodeServed(_Answer):
    node_id: int
    name: str
    generation: int | None
    in_sync: bool
    fingerprint: str | None
    services: list[dict[str, Any]]
    verified_at: str | None


class CertificateDetail(_Answer):
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


class NodeAnswer(_Answer):
    uid: int
    name: str
    agent_url: str
    joined_at: str
    reachable: bool
    last_seen: str | None
    in_sync: bool
    certificates: dict[str, dict[str, Any]]


class RemovedNodeAnswer(_Answer):
    uid: int
    name: str
    agent_url: str
    removed: bool


class CaAnswer(_Answer):
    ca_certificate: str
    ca_cert_hash: str


class JoinAnswer(_Answer):
    node_id: int
    certificate: str
    ca_certificate: str
    cluster_name: str


class UserBody(_Answer):
    uid: int
    email: str
    name: str
    role: str
    auth_method: Literal["regular", "certificate"]
    # Absent (not null) for regular users: routes answering users set response_model_exclude_none.
    certificate_subject_line: str | None = None

    @classmethod
    def of(cls, user: User) -> UserBody:
        """What the API shows of a user: these fields, never the password hash."""
        return cls.model_validate(user, from_attributes=True)


def rollout_answer(body: BaseModel) -> JSONResponse:
    """A rollout's answer, dumped once: it skips FastAPI's response-model validation, whose
    cost grew with every node in the body (measured by ``make bench``)."""
    return JSONResponse(body.model_dump(mode="json"))


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
    503: "the state store does not answer (store_unavailable); nodes keep serving what they serve",
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
