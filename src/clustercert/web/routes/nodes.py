"""``/nodes``: every node and what it proved for each certificate."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from clustercert.control.http import Plane
from clustercert.web.http import logged_in, render
from clustercert.web.views import node_rows

__all__ = ["router"]

router = APIRouter()


@router.get("/nodes")
async def nodes(request: Request, cp: Plane) -> Response:
    login = await logged_in(request)
    return render(request, "nodes.html", login=login, nodes=await node_rows(cp.state))
