"""``/v1/cluster/ca``: the internal CA, and rotating it (docs/ca-rotation.md).

==============================  =====================  ==================  ==================
method and path                 body                   permission          success
==============================  =====================  ==================  ==================
``GET /v1/cluster/ca``          —                      view_cluster_info   200, the CA state
``POST /v1/cluster/ca/rotate``  none, or ``{}``        update_cluster      202, the CA state
==============================  =====================  ==================  ==================

``POST`` records a new rotation and answers at once (202): the phases run in the control
plane's background loop, each proven on every node, and recover after a crash. A second
``POST`` while one runs is a 409 ``ca_rotation_in_progress`` that changes nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from clustercert.control.answers import answers, request_body
from clustercert.control.http import Plane, StrictModel, Updater, Viewer, parse_model, read_json
from clustercert.errors import ClusterCertError

__all__ = ["router"]

router = APIRouter()


class CaRotateBody(StrictModel):
    """No options yet: an empty object (or no body)."""


class CaNodeProgress(BaseModel):
    """One node's progress through the rotation: ``trusts`` (``both`` once it trusts the old
    and the new CA, ``new`` once only the new), ``identity`` (the fingerprint of the identity
    it re-issued), ``reissued``, ``accepts_new_identity``, and ``error`` (why its last step
    failed, as this control plane saw it)."""

    model_config = ConfigDict(extra="allow")

    uid: int
    name: str


class CaStateAnswer(BaseModel):
    """Where the internal CA is: its fingerprint, which CAs are trusted now, and the
    rotation's phase (``idle``, ``trusting``, ``reissuing``, ``switching``, ``retiring``,
    ``done``); ``state`` is ``waiting_for_nodes`` while the phase waits for the nodes named
    in ``waiting_for_nodes``, otherwise the phase."""

    model_config = ConfigDict(extra="forbid")

    phase: str
    state: str
    rotating: bool
    rotation: int
    fingerprint: str
    not_after: str
    subject: str
    signing_fingerprint: str
    trusted: list[str]
    new_fingerprint: str | None
    started_at: str | None
    finished_at: str | None
    started_by: str | None
    phase_started: dict[str, str]
    waiting_for_nodes: list[str]
    rollouts: int
    nodes: list[CaNodeProgress]


def _accepted(documented: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """``documented`` with its 200 as a 202 (the rotation runs after the answer)."""
    ok = documented.pop(200)
    return {202: {**ok, "description": "Accepted: the rotation runs"}, **documented}


def _rotation(cp: Any) -> Any:
    if cp.ca_rotation is None:  # pragma: no cover - every server builds one
        raise ClusterCertError("this control plane does not rotate the internal CA")
    return cp.ca_rotation


@router.get("/v1/cluster/ca", responses=answers(CaStateAnswer, 401, 403))
async def get_ca(cp: Plane, user: Viewer) -> dict[str, Any]:
    """The internal CA and the rotation's progress, per node."""
    answer: dict[str, Any] = await _rotation(cp).describe()
    return answer


@router.post(
    "/v1/cluster/ca/rotate",
    status_code=202,
    openapi_extra=request_body(CaRotateBody, required=False),
    responses=_accepted(answers(CaStateAnswer, 400, 401, 403, 408, 409, 413, 415)),
)
async def rotate_ca(request: Request, cp: Plane, user: Updater) -> JSONResponse:
    """Start rotating the internal CA (admin only). 409 ``ca_rotation_in_progress`` while a
    rotation runs; nothing changes then."""
    if request.headers.get("content-length") not in (None, "0") or request.headers.get(
        "content-type"
    ):
        parse_model(CaRotateBody, await read_json(request))
    rotation = _rotation(cp)
    await rotation.start(user.email)
    return JSONResponse(await rotation.describe(), status_code=202)
