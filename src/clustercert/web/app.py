"""The console's routes: login, the pages, and the two certificate actions (validate, replace).

Every page needs a session (:mod:`.sessions`); every POST after login carries the session's
CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``), and a POST whose ``Origin``
is another site is refused outright. The order of checks for the actions follows the API's
(DESIGN §4.2): session (401), permission (403), body size (413), CSRF token (403), then
validation. Errors are the domain's own (:mod:`clustercert.errors`); a failed validation or
rollout is shown in place on the certificate's page, with the status the API would answer.

Pages are Jinja2 templates with autoescaping: every certificate-derived string (subjects, SANs,
error descriptions quoting them) is text, never markup. Responses carry a strict
Content-Security-Policy (no inline script or style; scripts and styles from this origin only)
and ``X-Frame-Options: DENY``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from clustercert.control.http import MAX_BODY
from clustercert.control.listener import ASGIApp, Message, Receive, Scope, Send
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
from clustercert.names import NAMES
from clustercert.roles import UPDATE, VIEW
from clustercert.validation import validate_upload
from clustercert.web.sessions import COOKIE, CsrfRejected, Session, SessionStore
from clustercert.web.views import certificate_detail, certificate_rows, node_rows

__all__ = ["CSP", "EVENTS_PER_PAGE", "build_console"]

log = logging.getLogger("clustercert.console")

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Origin "null"
    (b"cache-control", b"no-store"),
]
EVENTS_PER_PAGE = 50
_LOGIN_BODY = 16 * 1024  # an e-mail address, a password and a token


class SecurityHeaders:
    """ASGI middleware: the security headers above on every response, static files included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class _Login(Exception):
    """No live session: GET pages redirect to the login form."""


def _cookie_value(request: Request) -> str | None:
    return request.cookies.get(COOKIE)


async def _read_form(request: Request, limit: int, max_files: int) -> FormData:
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


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


async def _file_text(form: FormData, name: str) -> str | None:
    """An uploaded file as text (latin-1: one code point per byte, so DER or PKCS#12 reach
    validation intact and get its "convert it with..." message); None when none was chosen."""
    value = form.get(name)
    if not isinstance(value, UploadFile):
        return None
    data = await value.read()
    return data.decode("latin-1") if data else None


def build_console(cp: ControlPlane, sessions: SessionStore | None = None) -> ASGIApp:
    """The console as an ASGI app for its own listener (``clustercert server``)."""
    store = sessions or SessionStore()
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(
        request: Request,
        template: str,
        status: int = 200,
        login: tuple[Session, User] | None = None,
        **values: Any,
    ) -> HTMLResponse:
        session, user = login if login else (None, None)
        html = templates.get_template(template).render(
            user=user,
            csrf_token=session.csrf_token if session else "",
            can_update=user is not None and UPDATE in user.permissions,
            path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    async def current(request: Request) -> tuple[Session, User] | None:
        """The live session and its user, read afresh (a changed role applies at once; a
        deleted user's session opens nothing)."""
        session = store.get(_cookie_value(request))
        user = await cp.state.user(session.email) if session else None
        return (session, user) if session is not None and user is not None else None

    async def logged_in(request: Request, permission: str = VIEW) -> tuple[Session, User]:
        login = await current(request)
        if login is None:
            if request.method == "GET":
                raise _Login
            raise Unauthorized("your session has ended; log in again")
        login[1].require(permission)
        return login

    def same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"https://{request.headers.get('host', '')}":
            raise CsrfRejected(f"a form from {origin} may not act on this console")

    @app.exception_handler(_Login)
    async def to_login(request: Request, exc: _Login) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(ClusterCertError)
    async def domain_error(request: Request, exc: ClusterCertError) -> Response:
        return render(request, "error.html", exc.http_status, await current(request), error=exc)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        return render(request, "error.html", 400, error=InvalidSchema(f"bad parameter: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error: ClusterCertError
        if exc.status_code == 404:
            error = CertificateNotFound(f"no such page: {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            error = BadRequest(str(exc.detail))
        return render(request, "error.html", error.http_status, error=error)

    # --- login ---------------------------------------------------------------------------

    @app.get("/login")
    async def login_form(request: Request) -> Response:
        if await current(request) is not None:
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html")

    @app.post("/login")
    async def login(request: Request) -> Response:
        same_origin(request)
        form = await _read_form(request, _LOGIN_BODY, max_files=0)
        email = (_field(form, "email") or "").strip()
        client = request.client
        try:
            # The API's authenticator: same users, same throttle, same log lines.
            user = await cp.authenticator.authenticate(
                email, _field(form, "password") or "", source=client.host if client else "unknown"
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

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        same_origin(request)
        session, _user = await logged_in(request)
        form = await _read_form(request, _LOGIN_BODY, max_files=0)
        session.check_csrf(_field(form, "csrf_token") or request.headers.get("x-csrf-token"))
        store.end(session.session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    # --- pages ---------------------------------------------------------------------------

    @app.get("/")
    async def certificates(request: Request) -> Response:
        login = await logged_in(request)
        rows = await certificate_rows(cp.state, cp.clock())
        return render(request, "certificates.html", login=login, rows=rows)

    async def detail_page(
        request: Request,
        login: tuple[Session, User],
        name: str,
        status: int = 200,
        result: Mapping[str, Any] | None = None,
    ) -> HTMLResponse:
        detail = await certificate_detail(cp.state, name, cp.clock())
        return render(
            request, "certificate.html", status, login, detail=detail, row=NAMES[name],
            result=result,
        )  # fmt: skip

    def known(name: str) -> str:
        if name not in NAMES:
            raise CertificateNotFound(f"{name!r} is not a certificate name")
        return name

    @app.get("/certificates/{name}")
    async def certificate(request: Request, name: str) -> Response:
        login = await logged_in(request)
        return await detail_page(request, login, known(name))

    async def upload(request: Request, name: str) -> tuple[tuple[Session, User], str, str | None]:
        """The checks every certificate action makes, in the API's order; then the files."""
        same_origin(request)
        login = await logged_in(request, UPDATE)
        known(name)
        form = await _read_form(request, MAX_BODY, max_files=2)
        login[0].check_csrf(_field(form, "csrf_token") or request.headers.get("x-csrf-token"))
        certificate = await _file_text(form, "certificate")
        if certificate is None:
            raise InvalidSchema("choose a Certificate file (PEM: the certificate and its chain)")
        return login, certificate, await _file_text(form, "key")

    @app.post("/certificates/{name}/validate")
    async def validate(request: Request, name: str) -> Response:
        login, certificate, key = await upload(request, name)
        try:
            validated = validate_upload(name, certificate, key, at=cp.clock(), trust=cp.trust)
        except ClusterCertError as exc:
            return await detail_page(
                request, login, name, exc.http_status, _failure("validate", exc)
            )
        result = {
            "action": "validate",
            "status": 200,
            "ok": True,
            "summary": validated.summary(),
            "warnings": list(validated.warnings),
        }
        return await detail_page(request, login, name, 200, result)

    @app.post("/certificates/{name}/replace")
    async def replace(request: Request, name: str) -> Response:
        login, certificate, key = await upload(request, name)
        user = login[1]
        try:
            validated = validate_upload(name, certificate, key, at=cp.clock(), trust=cp.trust)
        except ClusterCertError as exc:
            return await detail_page(
                request, login, name, exc.http_status, _failure("replace", exc)
            )
        try:
            [stored], outcomes = await cp.replace([validated], user)
        except ClusterCertError as exc:
            return await detail_page(
                request, login, name, exc.http_status, _failure("replace", exc)
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
        return await detail_page(request, login, name, 200, result)

    @app.get("/rollout")
    async def rollout(request: Request) -> Response:
        """The rollout this control plane runs, node by node, for the Replace page's live view:
        what ``GET /v1/cluster/certificates/rollout`` answers."""
        await logged_in(request)
        progress = cp.coordinator.progress
        return JSONResponse(progress.as_json() if progress is not None else {"in_progress": False})

    @app.get("/nodes")
    async def nodes(request: Request) -> Response:
        login = await logged_in(request)
        return render(request, "nodes.html", login=login, nodes=await node_rows(cp.state))

    @app.get("/history")
    async def history(request: Request, page: int = 1) -> Response:
        login = await logged_in(request)
        events = await cp.state.events()
        pages = max(1, math.ceil(len(events) / EVENTS_PER_PAGE))
        page = min(max(page, 1), pages)
        start = (page - 1) * EVENTS_PER_PAGE
        return render(
            request, "history.html", login=login, events=events[start : start + EVENTS_PER_PAGE],
            page=page, pages=pages, total=len(events),
        )  # fmt: skip

    return SecurityHeaders(app)


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
