"""``/metrics`` (Prometheus) and ``/openapi.json``: about the API itself, authenticated like
every endpoint."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from clustercert.control.http import control_plane, requires
from clustercert.control.metrics import CONTENT_TYPE
from clustercert.control.plane import ControlPlane
from clustercert.control.state import User
from clustercert.roles import VIEW

__all__ = ["router"]

router = APIRouter()

Viewer = Annotated[User, Depends(requires(VIEW))]


@router.get("/metrics", include_in_schema=False)
async def metrics(cp: Annotated[ControlPlane, Depends(control_plane)], user: Viewer) -> Response:
    return Response(cp.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, user: Viewer) -> dict[str, Any]:
    document: dict[str, Any] = request.app.openapi()
    return document
