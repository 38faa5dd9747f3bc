"""The console's edge, shared by its routes (:mod:`clustercert.web.routes`): who is logged in,
the same-origin and CSRF checks, reading a form within limits, rendering a page, and the one
mapping from failures to error pages.

``build_console`` puts what these need on the application: the :class:`ControlPlane`
(``app.state.control_plane``, as the API does, so routes declare
:data:`clustercert.control.http.Plane`), the :class:`SessionStore` (``app.state.sessions``) and
the Jinja environment (``app.state.templates``).

Checks are called by the routes in the API's order (DESIGN §4.2), never declared as
dependencies: FastAPI would run those before it validates a page's query parameters, and a bad
parameter answers 400 whoever asks.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from clustercert.control.listener import Message
from clustercert.control.plane import ControlPlane
from clustercert.control.state import User
from clustercert.errors import (
    BadRequest,
    CertificateNotFound,
    ClusterCertError,
    InvalidSchema,
    MethodNotAllowed,
    PayloadTooLarge,
    Unauthorized,
)
from clustercert.roles import UPDATE, VIEW
from clustercert.web.sessions import COOKIE, CsrfRejected, Session, SessionStore

__all__ = [
    "LOGIN_BODY",
    "Login",
    "Sessions",
    "check_csrf",
    "current",
    "field",
    "file_text",
    "install_error_handlers",
    "logged_in",
    "read_form",
    "render",
    "same_origin",
    "session_store",
]

LOGIN_BODY = 16 * 1024  # an e-mail address, a password and a token

Login = tuple[Session, User]
"""A live session and its user."""


async def session_store(request: Request) -> SessionStore:
    """The :class:`SessionStore` ``build_console`` put on the application (a dependency)."""
    store: SessionStore = request.app.state.sessions
    return store


Sessions = Annotated[SessionStore, Depends(session_store)]


class _ToLogin(Exception):
    """No live session: GET pages redirect to the login form."""


# --- who is logged in ---------------------------------------------------------------------------


async def current(request: Request) -> Login | None:
    """The live session and its user, read afresh (a changed role applies at once; a deleted
    user's session opens nothing)."""
    cp: ControlPlane = request.app.state.control_plane
    session = (await session_store(request)).get(request.cookies.get(COOKIE))
    user = await cp.state.user(session.email) if session else None
    return (session, user) if session is not None and user is not None else None


async def logged_in(request: Request, permission: str = VIEW) -> Login:
    """The live session holding ``permission``: a GET without one is sent to the login form,
    any other method answers 401; 403 without the permission."""
    login = await current(request)
    if login is None:
        if request.method == "GET":
            raise _ToLogin
        raise Unauthorized("your session has ended; log in again")
    login[1].require(permission)
    return login


def same_origin(request: Request) -> None:
    """Refuse a POST whose ``Origin`` is another site."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"https://{request.headers.get('host', '')}":
        raise CsrfRejected(f"a form from {origin} may not act on this console")


def check_csrf(request: Request, session: Session, form: FormData) -> None:
    """The session's CSRF token, from the form field ``csrf_token`` or the header
    ``X-CSRF-Token``."""
    session.check_csrf(field(form, "csrf_token") or request.headers.get("x-csrf-token"))


# --- forms --------------------------------------------------------------------------------------


async def read_form(request: Request, limit: int, max_files: int) -> FormData:
    """The request's form within ``limit`` bytes (413 past it, counted before parsing).

    ``limit`` is at most Starlette's spooling threshold (1 MiB), so an uploaded key stays in
    memory: it never reaches a temporary file."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=max_files, max_fields=8)
    except StarletteHTTPException as exc:  # a malformed multipart body
        raise BadRequest(f"the form could not be read: {exc.detail}") from None


def field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


async def file_text(form: FormData, name: str) -> str | None:
    """An uploaded file as text (latin-1: one code point per byte, so DER or PKCS#12 reach
    validation intact and get its "convert it with..." message); None when none was chosen."""
    value = form.get(name)
    if not isinstance(value, UploadFile):
        return None
    data = await value.read()
    return data.decode("latin-1") if data else None


# --- pages --------------------------------------------------------------------------------------


def render(
    request: Request,
    template: str,
    status: int = 200,
    login: Login | None = None,
    **values: Any,
) -> HTMLResponse:
    """``template`` rendered for ``login`` (None: nobody logged in)."""
    templates: Environment = request.app.state.templates
    session, user = login if login else (None, None)
    html = templates.get_template(template).render(
        user=user,
        csrf_token=session.csrf_token if session else "",
        can_update=user is not None and UPDATE in user.permissions,
        path=request.url.path,
        **values,
    )
    return HTMLResponse(html, status_code=status)


# --- failures -----------------------------------------------------------------------------------


async def _to_login(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/login", status_code=303)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClusterCertError)
    return render(request, "error.html", exc.http_status, await current(request), error=exc)


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
    return render(request, "error.html", 400, error=InvalidSchema(f"bad parameter: {problems}"))


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own 404 (no route) and 405 (no such method on a route), as error pages.
    assert isinstance(exc, StarletteHTTPException)
    error: ClusterCertError
    if exc.status_code == 404:
        error = CertificateNotFound(f"no such page: {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = BadRequest(str(exc.detail))
    return render(request, "error.html", error.http_status, error=error)


def install_error_handlers(app: FastAPI) -> None:
    """The one mapping from failures to pages: routes raise, these answer."""
    app.add_exception_handler(_ToLogin, _to_login)
    app.add_exception_handler(ClusterCertError, _domain_error)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(StarletteHTTPException, _http_error)
