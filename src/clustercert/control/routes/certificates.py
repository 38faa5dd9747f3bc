"""``/v1/cluster/...``: upload, validate, list, delete and rotate certificates, their audit
events and the rollout in progress (DESIGN §4).

Validation order after the edge's checks (:mod:`clustercert.control.http`): unknown name, then
each certificate. The rollout answers are dumped once by :func:`rollout_answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from cryptography import x509
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from clustercert.control.answers import (
    CertificateAnswer,
    CertificateDetail,
    CertificatesAnswer,
    CertificateSummary,
    DeletedAnswer,
    EventsAnswer,
    NodeOutcomeBody,
    NodeServed,
    RotateAnswer,
    RotatedCertificate,
    ValidateAnswer,
    answers,
    request_body,
    rollout_answer,
)
from clustercert.control.directory import reissue_internal
from clustercert.control.http import (
    Plane,
    StrictModel,
    Updater,
    Viewer,
    parse_model,
    read_json,
)
from clustercert.control.plane import ControlPlane
from clustercert.control.rollout import NodeOutcome
from clustercert.control.state import CertRecord, proves
from clustercert.errors import (
    CertificateNotFound,
    InvalidSchema,
    NotRotatable,
    RequiredCertificate,
)
from clustercert.names import NAMES, lookup
from clustercert.validation import (
    UploadItem,
    ValidatedCertificate,
    validate_all,
    validate_upload,
)

__all__ = ["CertificateItem", "CertificatesBody", "RotateBody", "router"]

router = APIRouter()


class CertificateItem(StrictModel):
    name: str
    certificate: str
    key: str | None = None
    # Optimistic concurrency: the generation the caller read (0: not set); 409
    # generation_mismatch when the certificate moved since.
    expected_generation: int | None = Field(default=None, ge=0)


class CertificatesBody(StrictModel):
    # At least one: an empty list is a 400 on every route, never an IndexError (found by fuzzing).
    certificates: list[CertificateItem] = Field(min_length=1)


class RotateBody(StrictModel):
    name: str | None = None


@router.put(
    "/v1/cluster/update_cert",
    openapi_extra=request_body(CertificateItem),
    responses=answers(CertificateAnswer, 400, 401, 403, 404, 406, 408, 409, 413, 415),
)
async def update_cert(request: Request, cp: Plane, user: Updater) -> JSONResponse:
    item = parse_model(CertificateItem, await read_json(request))
    validated = _validate_items(cp, [item], batch=False)
    stored, outcomes = await cp.replace(validated, user, _expected([item], request))
    summary = _summary(validated[0], stored[0])
    return rollout_answer(CertificateAnswer(**dict(summary), nodes=_nodes(outcomes)))


@router.put(
    "/v1/cluster/certificates",
    openapi_extra=request_body(CertificatesBody | CertificateItem),
    responses=answers(CertificatesAnswer, 400, 401, 403, 404, 406, 408, 409, 413, 415),
)
async def put_certificates(request: Request, cp: Plane, user: Updater) -> JSONResponse:
    data = await read_json(request)
    if isinstance(data, dict) and "certificates" not in data and "name" in data:
        # redisctl sends the flat update_cert object to this path: a one-item list.
        data = {"certificates": [data]}
    body = parse_model(CertificatesBody, data)
    names = [c.name for c in body.certificates]
    if len(set(names)) != len(names):
        raise InvalidSchema("certificates: each name may appear once")
    validated = _validate_items(cp, body.certificates, batch=True)
    stored, outcomes = await cp.replace(validated, user, _expected(body.certificates, request))
    return rollout_answer(
        CertificatesAnswer(
            certificates=[_summary(v, s) for v, s in zip(validated, stored, strict=True)],
            nodes=_nodes(outcomes),
        )
    )


def _expected(items: Sequence[CertificateItem], request: Request) -> dict[str, int]:
    """The generations the caller read: each item's ``expected_generation``, or for one item
    an ``If-Match: "N"`` header (the ``etag`` GET answers). Both for one item must agree."""
    expected = {i.name: i.expected_generation for i in items if i.expected_generation is not None}
    header = request.headers.get("if-match")
    if header is None:
        return expected
    tag = header.strip().removeprefix("W/").strip('"')
    if len(items) != 1 or not tag.isdigit():
        raise InvalidSchema(
            'If-Match: expected one quoted generation, e.g. "3", on a one-certificate update '
            f"(got {header[:40]!r})"
        )
    name = items[0].name
    if expected.get(name, int(tag)) != int(tag):
        raise InvalidSchema("If-Match and expected_generation disagree")
    return {name: int(tag)}


@router.post(
    "/v1/cluster/certificates/validate",
    openapi_extra=request_body(CertificatesBody | CertificateItem),
    responses=answers(ValidateAnswer, 400, 401, 403, 404, 406, 408, 413, 415),
)
async def validate(request: Request, cp: Plane, user: Updater) -> ValidateAnswer:
    data = await read_json(request)
    if isinstance(data, dict) and "certificates" not in data:
        data = {"certificates": [data]}
    body = parse_model(CertificatesBody, data)
    validated = _validate_items(cp, body.certificates, batch=len(body.certificates) > 1)
    return ValidateAnswer(
        valid=True,
        certificates=[
            {**v.summary(), "name": v.name, "warnings": list(v.warnings)} for v in validated
        ],
    )


@router.delete(
    "/v1/cluster/certificates/{name}", responses=answers(DeletedAnswer, 401, 403, 404, 409)
)
async def delete_certificate(name: str, cp: Plane, user: Updater) -> JSONResponse:
    row = NAMES.get(name)
    if row is None:
        raise CertificateNotFound(f"{name!r} is not a certificate name")
    if not row.deletable:
        raise RequiredCertificate(
            f"{name} is required by the cluster and cannot be deleted; replace it with "
            "PUT /v1/cluster/update_cert or re-issue it with POST .../certificates/rotate"
        )
    record = await cp.state.certificate(name)
    if record is None:
        raise CertificateNotFound(f"{name} is not set")
    outcomes = await cp.coordinator.remove(record, user.email)
    return rollout_answer(DeletedAnswer(name=name, deleted=True, nodes=_nodes(outcomes)))


@router.post(
    "/v1/cluster/certificates/rotate",
    openapi_extra=request_body(RotateBody, required=False),
    responses=answers(RotateAnswer, 400, 401, 403, 408, 409, 413, 415),
)
async def rotate(request: Request, cp: Plane, user: Updater) -> JSONResponse:
    data: Any = {}
    if request.headers.get("content-length") not in (None, "0") or request.headers.get(
        "content-type"
    ):
        data = await read_json(request)
    body = parse_model(RotateBody, data)
    records = [await cp.state.certificate(n) for n in await _rotation_names(cp, body.name)]
    current = [r for r in records if r is not None]
    now = cp.clock()
    fresh = [await reissue_internal(cp.state, cp.ca, r.name, now, user.email) for r in current]
    outcomes = await cp.roll_out(fresh, user)
    stored = [await cp.state.certificate(r.name) or r for r in fresh]
    return rollout_answer(
        RotateAnswer(
            certificates=[
                RotatedCertificate(name=r.name, generation=r.generation,
                                   fingerprint_sha256=r.fingerprint, not_after=r.not_after)
                for r in stored
            ],
            nodes=_nodes(outcomes),
        )
    )  # fmt: skip


@router.get("/v1/cluster/certificates", responses=answers(dict[str, str], 401, 403))
async def get_certificates(cp: Plane, user: Viewer) -> dict[str, str]:
    answer: dict[str, str] = {}
    for record in await cp.state.certificates():
        answer[f"{record.name}_cert"] = record.certificate
        if record.key is not None and user.role == "admin":
            answer[f"{record.name}_key"] = record.key
    return answer


@router.get("/v1/cluster/certificates/events", responses=answers(EventsAnswer, 400, 401, 403))
async def events(
    cp: Plane,
    user: Viewer,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> EventsAnswer:
    """Newest first; out-of-range ``limit`` or ``offset`` is 400 ``invalid_schema``, not
    silently clamped."""
    everything = await cp.state.events()
    return EventsAnswer(total=len(everything), events=everything[offset : offset + limit])


@router.get("/v1/cluster/certificates/rollout", responses=answers(dict[str, Any], 401, 403))
async def rollout_progress(cp: Plane, user: Viewer) -> dict[str, Any]:
    """The rollout this control plane is running, node by node (``in_progress`` false when
    none is)."""
    return cp.coordinator.progress_answer()


@router.get("/v1/cluster/certificates/{name}", responses=answers(CertificateDetail, 401, 403, 404))
async def get_certificate(
    name: str, cp: Plane, user: Viewer, response: Response
) -> CertificateDetail:
    if name not in NAMES:
        raise CertificateNotFound(f"{name!r} is not a certificate name")
    record = await cp.state.certificate(name)
    if record is None:
        raise CertificateNotFound(f"{name} is not set")
    response.headers["ETag"] = f'"{record.generation}"'  # for If-Match on update_cert
    nodes = []
    proofs = await cp.state.applied_by_node()
    for node in await cp.state.nodes():
        applied = proofs.get(node.node_id, {}).get(name)
        nodes.append(
            NodeServed(
                node_id=node.node_id,
                name=node.name,
                generation=applied.generation if applied else None,
                # Like GET /v1/nodes: never in sync while nobody can reach the node.
                in_sync=proves(applied, record.generation)
                and cp.reconciler.health.of(node.node_id).reachable,
                fingerprint=applied.fingerprint if applied else None,
                services=applied.services if applied else [],
                verified_at=applied.at if applied else None,
            )
        )
    leaf = x509.load_pem_x509_certificates(record.certificate.encode())[0]
    return CertificateDetail(
        name=name,
        generation=record.generation,
        source=record.source,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        fingerprint_sha256=record.fingerprint,
        not_after=record.not_after,
        updated_at=record.updated_at,
        updated_by=record.updated_by,
        nodes=nodes,
    )


# --- helpers ------------------------------------------------------------------------------------


def _summary(validated: ValidatedCertificate, record: CertRecord) -> CertificateSummary:
    return CertificateSummary(
        name=record.name,
        generation=record.generation,
        fingerprint_sha256=record.fingerprint,
        not_after=record.not_after,
        warnings=list(validated.warnings),
    )


def _nodes(outcomes: Sequence[NodeOutcome]) -> list[NodeOutcomeBody]:
    # The outcome's shape is rollout.py's (as_json); the model checks it and passes it through.
    return [NodeOutcomeBody.model_validate(o.as_json()) for o in outcomes]


def _validate_items(
    cp: ControlPlane, items: Sequence[CertificateItem], batch: bool
) -> list[ValidatedCertificate]:
    """update_cert answers 404 for an incomplete chain; a batch validates every item, lists
    every problem, and answers with the first failing item's (batch) status."""
    for item in items:
        lookup(item.name)  # 403 unknown_certificate before any certificate is parsed
    if not batch:
        only = items[0]
        return [
            validate_upload(only.name, only.certificate, only.key, at=cp.clock(), trust=cp.trust)
        ]
    uploads = [UploadItem(i.name, i.certificate, i.key) for i in items]
    return validate_all(uploads, at=cp.clock(), trust=cp.trust)


async def _rotation_names(cp: ControlPlane, name: str | None) -> list[str]:
    """The names a rotate request re-issues: one, or every autogenerated one the internal CA
    still owns (user-provided certificates are the operator's to replace)."""
    if name is None:
        return [
            r.name
            for r in await cp.state.certificates()
            if NAMES[r.name].autogenerated and r.source == "internal"
        ]
    row = lookup(name)
    if not row.autogenerated:
        raise NotRotatable(f"{name} is not autogenerated; upload a new one with update_cert")
    record = await cp.state.certificate(name)
    if record is not None and record.source != "internal":
        raise NotRotatable(
            f"{name} is currently user-provided (set by {record.updated_by}); rotation would "
            "replace it with an internal-CA certificate. Upload its successor with update_cert"
        )
    return [name]
