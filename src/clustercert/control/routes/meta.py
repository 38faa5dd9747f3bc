"""``/metrics`` (Prometheus) and ``/openapi.json``: about the API itself, authenticated like
every endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from clustercert.control.http import Plane, Viewer
from clustercert.control.metrics import CONTENT_TYPE

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(cp: Plane, user: Viewer) -> Response:
    return Response(await cp.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, user: Viewer) -> dict[str, Any]:
    document: dict[str, Any] = request.app.openapi()
    return document
