"""``/login`` and ``/logout``: a console session in a cookie, for the API's users."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from clustercert.control.http import Plane
from clustercert.errors import Unauthorized
from clustercert.web.http import (
    LOGIN_BODY,
    Sessions,
    check_csrf,
    current,
    field,
    logged_in,
    read_form,
    render,
    same_origin,
)
from clustercert.web.sessions import COOKIE

__all__ = ["router"]

log = logging.getLogger("clustercert.console")

router = APIRouter()


@router.get("/login")
async def login_form(request: Request) -> Response:
    if await current(request) is not None:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html")


@router.post("/login")
async def login(request: Request, cp: Plane, store: Sessions) -> Response:
    same_origin(request)
    form = await read_form(request, LOGIN_BODY, max_files=0)
    email = (field(form, "email") or "").strip()
    client = request.client
    try:
        # The API's authenticator: same users, same throttle, same log lines.
        user = await cp.authenticator.authenticate(
            email, field(form, "password") or "", source=client.host if client else "unknown"
        )
    except Unauthorized as exc:
        return render(request, "login.html", 401, error=exc.description, email=email)
    session = store.create(user.email)
    log.info("console login: %s (role %s)", user.email, user.role)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        session.session_id,
        max_age=int(store.lifetime),
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
async def logout(request: Request, store: Sessions) -> Response:
    same_origin(request)
    session, _user = await logged_in(request)
    check_csrf(request, session, await read_form(request, LOGIN_BODY, max_files=0))
    store.end(session.session_id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response
