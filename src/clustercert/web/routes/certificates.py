"""The certificates: the list (``/``), each one's page with its two actions (validate,
replace), the rollout in progress for the Replace page's live view, and the history.

A failed validation or rollout is shown in place on the certificate's page, with the status
the API would answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from clustercert.control.http import MAX_BODY, Plane
from clustercert.control.plane import ControlPlane
from clustercert.errors import CertificateNotFound, ClusterCertError, InvalidSchema
from clustercert.names import NAMES
from clustercert.roles import UPDATE
from clustercert.validation import validate_upload
from clustercert.web.http import (
    Login,
    check_csrf,
    file_text,
    logged_in,
    read_form,
    render,
    same_origin,
)
from clustercert.web.views import certificate_detail, certificate_rows

__all__ = ["EVENTS_PER_PAGE", "router"]

log = logging.getLogger("clustercert.console")

router = APIRouter()

EVENTS_PER_PAGE = 50


@router.get("/")
async def certificates(request: Request, cp: Plane) -> Response:
    login = await logged_in(request)
    rows = await certificate_rows(cp.state, cp.clock())
    return render(request, "certificates.html", login=login, rows=rows)


@router.get("/certificates/{name}")
async def certificate(request: Request, name: str, cp: Plane) -> Response:
    login = await logged_in(request)
    return await _detail_page(request, cp, login, _known(name))


@router.post("/certificates/{name}/validate")
async def validate(request: Request, name: str, cp: Plane) -> Response:
    login, certificate, key = await _upload(request, name)
    try:
        validated = validate_upload(name, certificate, key, at=cp.clock(), trust=cp.trust)
    except ClusterCertError as exc:
        return await _detail_page(
            request, cp, login, name, exc.http_status, _failure("validate", exc)
        )
    result = {
        "action": "validate",
        "status": 200,
        "ok": True,
        "summary": validated.summary(),
        "warnings": list(validated.warnings),
    }
    return await _detail_page(request, cp, login, name, 200, result)


@router.post("/certificates/{name}/replace")
async def replace(request: Request, name: str, cp: Plane) -> Response:
    login, certificate, key = await _upload(request, name)
    user = login[1]
    try:
        validated = validate_upload(name, certificate, key, at=cp.clock(), trust=cp.trust)
        [stored], outcomes = await cp.replace([validated], user)
    except ClusterCertError as exc:
        return await _detail_page(
            request, cp, login, name, exc.http_status, _failure("replace", exc)
        )
    log.info("console: %s replaced %s on %d nodes", user.email, name, len(outcomes))
    result = {
        "action": "replace",
        "status": 200,
        "ok": True,
        "summary": validated.summary(),
        "warnings": list(validated.warnings),
        "generation": stored.generation,
        "nodes": [o.as_json() for o in outcomes],
    }
    return await _detail_page(request, cp, login, name, 200, result)


@router.get("/rollout")
async def rollout(request: Request, cp: Plane) -> Response:
    """The rollout this control plane runs, node by node, for the Replace page's live view:
    what ``GET /v1/cluster/certificates/rollout`` answers."""
    await logged_in(request)
    return JSONResponse(cp.coordinator.progress_answer())


@router.get("/history")
async def history(request: Request, cp: Plane, page: int = 1) -> Response:
    login = await logged_in(request)
    events = await cp.state.events()
    pages = max(1, math.ceil(len(events) / EVENTS_PER_PAGE))
    page = min(max(page, 1), pages)
    start = (page - 1) * EVENTS_PER_PAGE
    return render(
        request, "history.html", login=login, events=events[start : start + EVENTS_PER_PAGE],
        page=page, pages=pages, total=len(events),
    )  # fmt: skip


# --- helpers ------------------------------------------------------------------------------------


def _known(name: str) -> str:
    if name not in NAMES:
        raise CertificateNotFound(f"{name!r} is not a certificate name")
    return name


async def _detail_page(
    request: Request,
    cp: ControlPlane,
    login: Login,
    name: str,
    status: int = 200,
    result: Mapping[str, Any] | None = None,
) -> HTMLResponse:
    detail = await certificate_detail(cp.state, name, cp.clock())
    return render(
        request, "certificate.html", status, login, detail=detail, row=NAMES[name], result=result
    )


async def _upload(request: Request, name: str) -> tuple[Login, str, str | None]:
    """The checks every certificate action makes, in the API's order; then the files."""
    same_origin(request)
    login = await logged_in(request, UPDATE)
    _known(name)
    form = await read_form(request, MAX_BODY, max_files=2)
    check_csrf(request, login[0], form)
    certificate = await file_text(form, "certificate")
    if certificate is None:
        raise InvalidSchema("choose a Certificate file (PEM: the certificate and its chain)")
    return login, certificate, await file_text(form, "key")


def _failure(action: str, exc: ClusterCertError) -> dict[str, Any]:
    return {
        "action": action,
        "status": exc.http_status,
        "ok": False,
        "error_code": exc.error_code,
        "description": exc.description,
        "errors": exc.errors or [],
        "nodes": exc.nodes or [],
    }
