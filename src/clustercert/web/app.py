"""The console: one FastAPI application made of one router per area
(:mod:`clustercert.web.routes`: login, certificates, nodes) and the shared edge
(:mod:`clustercert.web.http`), behind the security headers below.

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

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from clustercert.control.listener import ASGIApp, Message, Receive, Scope, Send
from clustercert.control.plane import ControlPlane
from clustercert.web.http import install_error_handlers
from clustercert.web.routes import certificates, login, nodes
from clustercert.web.sessions import SessionStore

__all__ = ["CSP", "build_console"]

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


def build_console(cp: ControlPlane, sessions: SessionStore | None = None) -> ASGIApp:
    """The console as an ASGI app for its own listener (``clustercert server``); routes find
    ``cp`` with the API's ``Plane`` dependency, the sessions with ``Sessions``."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.control_plane = cp
    app.state.sessions = sessions or SessionStore()
    app.state.templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    install_error_handlers(app)
    for module in (login, certificates, nodes):
        app.include_router(module.router)
    return SecurityHeaders(app)
