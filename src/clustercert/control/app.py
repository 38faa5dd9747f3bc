"""The REST API (DESIGN §4): routes, the order of checks, and the one error handler.

Order of checks: authentication, permission, media type and size, JSON and schema, unknown
name, then validation of each certificate. Routes never choose a status code for a failure:
they raise from :mod:`clustercert.errors` and :func:`error_response` answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from clustercert import pki
from clustercert.clock import iso
from clustercert.control.apidoc import (
    CertificateAnswer,
    CertificateDetail,
    CertificatesAnswer,
    DeletedAnswer,
    EventsAnswer,
    JoinAnswer,
    NodeAnswer,
    RotateAnswer,
    ValidateAnswer,
    answers,
    request_body,
)
from clustercert.control.audit import NodeEvent
from clustercert.control.cluster_api import cluster_router
from clustercert.control.directory import internal_sans, issue_internal
from clustercert.control.http import error_response, parse_model, read_json
from clustercert.control.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from clustercert.control.plane import ControlPlane
from clustercert.control.rollout import NodeOutcome
from clustercert.control.state import CertRecord, NodeRecord, User
from clustercert.control.users import users_router
from clustercert.errors import (
    CertificateNotFound,
    ClusterCertError,
    InvalidSchema,
    MethodNotAllowed,
    NotFound,
    NotRotatable,
    RequiredCertificate,
    Unauthorized,
)
from clustercert.names import NAMES, lookup
from clustercert.roles import UPDATE, VIEW
from clustercert.validation import (
    UploadItem,
    ValidatedCertificate,
    validate_all,
    validate_upload,
)

__all__ = ["build_app"]

log = logging.getLogger("clustercert.api")


# --- request bodies (parsed once at the edge; unknown fields are errors) -----------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CertificateItem(_Strict):
    name: str
    certificate: str
    key: str | None = None


class CertificatesBody(_Strict):
    # At least one: an empty list is a 400 on every route, never an IndexError (found by fuzzing).
    certificates: list[CertificateItem] = Field(min_length=1)


class RotateBody(_Strict):
    name: str | None = None


class JoinBody(_Strict):
    token: str
    name: str
    agent_url: str
    csr: str


def _certificate_body(validated: ValidatedCertificate, record: CertRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "generation": record.generation,
        "fingerprint_sha256": record.fingerprint,
        "not_after": record.not_after,
        "warnings": list(validated.warnings),
    }


def rollout_answer(body: dict[str, Any]) -> JSONResponse:
    """A rollout's answer, already JSON: it skips FastAPI's response-model validation and
    encoder, whose cost grows with every node in the body (measured by ``make bench``)."""
    return JSONResponse(body)


def _nodes_body(outcomes: Sequence[NodeOutcome]) -> list[dict[str, Any]]:
    return [o.as_json() for o in outcomes]


def build_app(cp: ControlPlane) -> FastAPI:
    # The OpenAPI document is served by an authenticated route below, like every endpoint.
    app = FastAPI(
        title="clustercert", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A malformed path or query parameter; authentication is still checked first.
        try:
            cp.authenticator.authenticate_scope(request.scope)
        except ClusterCertError as auth_error:
            return error_response(auth_error)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(InvalidSchema(f"invalid request parameter: {problems}"))

    @app.exception_handler(ClusterCertError)
    async def domain_error(request: Request, exc: ClusterCertError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.description)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            )
        if exc.status_code == 404:
            return error_response(
                CertificateNotFound(f"no such endpoint: {request.method} {request.url.path}")
            )
        return JSONResponse({"error_code": "http_error", "description": str(exc.detail),
                             "message": str(exc.detail)}, status_code=exc.status_code)  # fmt: skip

    def user_with(request: Request, permission: str) -> User:
        user = cp.authenticator.authenticate_scope(request.scope)
        user.require(permission)
        return user

    def validate_items(items: Sequence[CertificateItem], batch: bool) -> list[ValidatedCertificate]:
        """update_cert answers 404 for an incomplete chain; a batch validates every item, lists
        every problem, and answers with the first failing item's (batch) status."""
        for item in items:
            lookup(item.name)  # 403 unknown_certificate before any certificate is parsed
        if not batch:
            only = items[0]
            return [
                validate_upload(
                    only.name, only.certificate, only.key, at=cp.clock(), trust=cp.trust
                )
            ]
        uploads = [UploadItem(i.name, i.certificate, i.key) for i in items]
        return validate_all(uploads, at=cp.clock(), trust=cp.trust)

    def proposed(validated: ValidatedCertificate, user: User) -> CertRecord:
        return CertRecord(
            name=validated.name,
            generation=0,
            certificate=validated.chain_pem,
            key=validated.key_pem,
            fingerprint=validated.fingerprint_sha256,
            not_after=iso(validated.not_after),
            source="user",
            updated_at="",
            updated_by=user.email,
        )

    async def roll_out(
        validated: list[ValidatedCertificate], user: User
    ) -> tuple[list[CertRecord], list[NodeOutcome]]:
        records = [proposed(v, user) for v in validated]
        outcomes = await timed_roll_out(records, user)
        stored = [cp.state.certificate(r.name) or r for r in records]
        return stored, outcomes

    async def timed_roll_out(records: list[CertRecord], user: User) -> list[NodeOutcome]:
        started = time.monotonic()
        try:
            outcomes = await cp.coordinator.roll_out(records, user.email)
        except ClusterCertError as exc:
            cp.metrics.observe_rollout(exc.error_code, time.monotonic() - started)
            raise
        cp.metrics.observe_rollout("ok", time.monotonic() - started)
        return outcomes

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        user_with(request, VIEW)
        return Response(cp.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> dict[str, Any]:
        user_with(request, VIEW)
        return app.openapi()

    @app.put(
        "/v1/cluster/update_cert",
        openapi_extra=request_body(CertificateItem),
        responses=answers(CertificateAnswer, 400, 401, 403, 404, 406, 408, 409, 413, 415),
    )
    async def update_cert(request: Request) -> JSONResponse:
        user = user_with(request, UPDATE)
        item = parse_model(CertificateItem, await read_json(request))
        validated = validate_items([item], batch=False)
        stored, outcomes = await roll_out(validated, user)
        return rollout_answer(
            {**_certificate_body(validated[0], stored[0]), "nodes": _nodes_body(outcomes)}
        )

    @app.put(
        "/v1/cluster/certificates",
        openapi_extra=request_body(CertificatesBody | CertificateItem),
        responses=answers(CertificatesAnswer, 400, 401, 403, 404, 406, 408, 409, 413, 415),
    )
    async def put_certificates(request: Request) -> JSONResponse:
        user = user_with(request, UPDATE)
        data = await read_json(request)
        if isinstance(data, dict) and "certificates" not in data and "name" in data:
            # redisctl sends the flat update_cert object to this path: a one-item list.
            data = {"certificates": [data]}
        body = parse_model(CertificatesBody, data)
        if not body.certificates:
            raise InvalidSchema("certificates: give at least one certificate")
        names = [c.name for c in body.certificates]
        if len(set(names)) != len(names):
            raise InvalidSchema("certificates: each name may appear once")
        validated = validate_items(body.certificates, batch=True)
        stored, outcomes = await roll_out(validated, user)
        return rollout_answer(
            {
                "certificates": [
                    _certificate_body(v, s) for v, s in zip(validated, stored, strict=True)
                ],
                "nodes": _nodes_body(outcomes),
            }
        )

    @app.post(
        "/v1/cluster/certificates/validate",
        openapi_extra=request_body(CertificatesBody | CertificateItem),
        responses=answers(ValidateAnswer, 400, 401, 403, 404, 406, 408, 413, 415),
    )
    async def validate(request: Request) -> dict[str, Any]:
        user_with(request, UPDATE)
        data = await read_json(request)
        if isinstance(data, dict) and "certificates" not in data:
            data = {"certificates": [data]}
        body = parse_model(CertificatesBody, data)
        validated = validate_items(body.certificates, batch=len(body.certificates) > 1)
        return {
            "valid": True,
            "certificates": [
                {**v.summary(), "name": v.name, "warnings": list(v.warnings)} for v in validated
            ],
        }

    @app.delete(
        "/v1/cluster/certificates/{name}", responses=answers(DeletedAnswer, 401, 403, 404, 409)
    )
    async def delete_certificate(request: Request, name: str) -> JSONResponse:
        user = user_with(request, UPDATE)
        row = NAMES.get(name)
        if row is None:
            raise CertificateNotFound(f"{name!r} is not a certificate name")
        if not row.deletable:
            raise RequiredCertificate(
                f"{name} is required by the cluster and cannot be deleted; replace it with "
                "PUT /v1/cluster/update_cert or re-issue it with POST .../certificates/rotate"
            )
        record = cp.state.certificate(name)
        if record is None:
            raise CertificateNotFound(f"{name} is not set")
        outcomes = await cp.coordinator.remove(record, user.email)
        return rollout_answer({"name": name, "deleted": True, "nodes": _nodes_body(outcomes)})

    @app.post(
        "/v1/cluster/certificates/rotate",
        openapi_extra=request_body(RotateBody, required=False),
        responses=answers(RotateAnswer, 400, 401, 403, 408, 409, 413, 415),
    )
    async def rotate(request: Request) -> JSONResponse:
        user = user_with(request, UPDATE)
        data: Any = {}
        if request.headers.get("content-length") not in (None, "0") or request.headers.get(
            "content-type"
        ):
            data = await read_json(request)
        body = parse_model(RotateBody, data)
        records = [cp.state.certificate(n) for n in _rotation_names(cp, body.name)]
        current = [r for r in records if r is not None]
        now, validity = cp.clock(), cp.state.internal_cert_validity()
        sans = internal_sans(cp.state.nodes())
        fresh = [
            issue_internal(
                cp.ca, r.name, cp.state.cluster_name(), sans, now, 0, user.email, validity
            )
            for r in current
        ]
        outcomes = await timed_roll_out(fresh, user)
        stored = [cp.state.certificate(r.name) or r for r in fresh]
        return rollout_answer(
            {
                "certificates": [
                    {"name": r.name, "generation": r.generation,
                     "fingerprint_sha256": r.fingerprint, "not_after": r.not_after}
                    for r in stored
                ],
                "nodes": _nodes_body(outcomes),
            }
        )  # fmt: skip

    @app.get("/v1/cluster/certificates", responses=answers(dict[str, str], 401, 403))
    async def get_certificates(request: Request) -> dict[str, str]:
        user = user_with(request, VIEW)
        answer: dict[str, str] = {}
        for record in cp.state.certificates():
            answer[f"{record.name}_cert"] = record.certificate
            if record.key is not None and user.role == "admin":
                answer[f"{record.name}_key"] = record.key
        return answer

    @app.get("/v1/cluster/certificates/events", responses=answers(EventsAnswer, 400, 401, 403))
    async def events(request: Request, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        user_with(request, VIEW)
        everything = cp.state.events()
        limit = max(1, min(limit, 500))
        return {"total": len(everything), "events": everything[offset : offset + limit]}

    @app.get("/v1/cluster/certificates/rollout", responses=answers(dict[str, Any], 401, 403))
    async def rollout_progress(request: Request) -> dict[str, Any]:
        """The rollout this control plane is running, node by node (``in_progress`` false when
        none is)."""
        user_with(request, VIEW)
        progress = cp.coordinator.progress
        return progress.as_json() if progress is not None else {"in_progress": False}

    @app.get("/v1/cluster/certificates/{name}", responses=answers(CertificateDetail, 401, 403, 404))
    async def get_certificate(request: Request, name: str) -> dict[str, Any]:
        user_with(request, VIEW)
        if name not in NAMES:
            raise CertificateNotFound(f"{name!r} is not a certificate name")
        record = cp.state.certificate(name)
        if record is None:
            raise CertificateNotFound(f"{name} is not set")
        nodes = []
        for node in cp.state.nodes():
            applied = cp.state.applied(node.node_id).get(name)
            nodes.append(
                {
                    "node_id": node.node_id,
                    "name": node.name,
                    "generation": applied.generation if applied else None,
                    "in_sync": bool(
                        applied and applied.ok and applied.generation == record.generation
                    ),
                    "fingerprint": applied.fingerprint if applied else None,
                    "services": applied.services if applied else [],
                    "verified_at": applied.at if applied else None,
                }
            )
        leaf = x509.load_pem_x509_certificates(record.certificate.encode())[0]
        return {
            "name": name,
            "generation": record.generation,
            "source": record.source,
            "subject": leaf.subject.rfc4514_string(),
            "issuer": leaf.issuer.rfc4514_string(),
            "fingerprint_sha256": record.fingerprint,
            "not_after": record.not_after,
            "updated_at": record.updated_at,
            "updated_by": record.updated_by,
            "nodes": nodes,
        }

    @app.get("/v1/nodes", responses=answers(list[NodeAnswer], 401, 403))
    async def nodes(request: Request) -> list[dict[str, Any]]:
        user_with(request, VIEW)
        desired = _desired_generations(cp)
        return [_node_body(cp, n, desired) for n in cp.state.nodes()]

    @app.get("/v1/nodes/{node_id}", responses=answers(NodeAnswer, 400, 401, 403, 404))
    async def node(request: Request, node_id: int) -> dict[str, Any]:
        user_with(request, VIEW)
        node = cp.state.node(node_id)
        if node is None:
            raise NotFound(f"no node with id {node_id}")
        return _node_body(cp, node, _desired_generations(cp))

    @app.post(
        "/v1/internal/join",
        openapi_extra=request_body(JoinBody),
        responses=answers(JoinAnswer, 400, 401, 408, 413, 415),
    )
    async def join(request: Request) -> dict[str, Any]:
        body = parse_model(JoinBody, await read_json(request))
        now = cp.clock()
        if not cp.state.consume_join_token(body.token, now):
            raise Unauthorized("the join token is unknown, already used or expired")
        host = _host(body.agent_url)
        try:
            certificate = pki.sign_csr(
                cp.ca, body.csr, body.name, sans=(host,), eku={"serverAuth"}, now=now
            )
        except ValueError as exc:
            raise InvalidSchema(f"csr: {exc}") from None
        node = cp.state.add_node(body.name, body.agent_url, now)
        cp.reconciler.wake(node.node_id)
        cp.state.add_event(
            NodeEvent(now, f"node:{body.name}", "join", node_id=node.node_id,
                      agent_url=body.agent_url)
        )  # fmt: skip
        return {
            "node_id": node.node_id,
            "certificate": certificate,
            "ca_certificate": cp.ca.cert_pem,
            "cluster_name": cp.state.cluster_name(),
        }

    app.include_router(users_router(cp))
    app.include_router(cluster_router(cp))
    return app


def _host(url: str) -> str:
    return url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def _rotation_names(cp: ControlPlane, name: str | None) -> list[str]:
    """The names a rotate request re-issues: one, or every autogenerated one the internal CA
    still owns (user-provided certificates are the operator's to replace)."""
    if name is None:
        return [
            r.name
            for r in cp.state.certificates()
            if NAMES[r.name].autogenerated and r.source == "internal"
        ]
    row = lookup(name)
    if not row.autogenerated:
        raise NotRotatable(f"{name} is not autogenerated; upload a new one with update_cert")
    record = cp.state.certificate(name)
    if record is not None and record.source != "internal":
        raise NotRotatable(
            f"{name} is currently user-provided (set by {record.updated_by}); rotation would "
            "replace it with an internal-CA certificate. Upload its successor with update_cert"
        )
    return [name]


def _desired_generations(cp: ControlPlane) -> dict[str, int]:
    return {r.name: r.generation for r in cp.state.certificates()}


def _node_body(cp: ControlPlane, node: NodeRecord, desired: dict[str, int]) -> dict[str, Any]:
    applied = cp.state.applied(node.node_id)
    in_sync = all(
        (a := applied.get(name)) is not None and a.ok and a.generation == generation
        for name, generation in desired.items()
    )
    return {
        "uid": node.node_id,
        "name": node.name,
        "agent_url": node.agent_url,
        "joined_at": node.joined_at,
        "in_sync": in_sync,
        "certificates": {
            name: {"generation": a.generation, "fingerprint": a.fingerprint, "ok": a.ok}
            for name, a in applied.items()
        },
    }
