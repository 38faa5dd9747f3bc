"""The HTTP edge shared by every router (DESIGN §4): who the caller is and what it may do,
reading a JSON body within limits, parsing it into a strict model, and the one mapping from
failures to the error body (DESIGN §4.3).

Order of checks (DESIGN §4.2): a route declares ``Depends(requires(PERMISSION))``, which FastAPI
runs before it validates path and query parameters; the route reads its body itself
(:func:`read_json`), after that. So authentication and permission always come first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clustercert.control.plane import ControlPlane
from clustercert.control.state import User
from clustercert.errors import (
    CertificateNotFound,
    ClusterCertError,
    InvalidJSON,
    InvalidSchema,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from clustercert.roles import MANAGE_USERS, UPDATE, VIEW

__all__ = [
    "MAX_BODY",
    "Manager",
    "Plane",
    "StrictModel",
    "Updater",
    "Viewer",
    "control_plane",
    "error_response",
    "install_error_handlers",
    "parse_model",
    "read_json",
    "requires",
]

log = logging.getLogger("clustercert.api")

MAX_BODY = 1024 * 1024
_M = TypeVar("_M", bound=BaseModel)


class StrictModel(BaseModel):
    """A request body: parsed once at the edge; unknown fields and coerced types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- the control plane and the caller ---------------------------------------------------------


async def control_plane(request: Request) -> ControlPlane:
    """The :class:`ControlPlane` ``build_app`` put on the application (a dependency)."""
    cp: ControlPlane = request.app.state.control_plane
    return cp


def requires(permission: str) -> Callable[[Request], Awaitable[User]]:
    """A dependency answering the authenticated :class:`User` that holds ``permission``;
    raises Unauthorized (401) or InsufficientPermissions (403) before anything else is read."""

    # async: FastAPI would run a plain function in a thread, per request, for nothing.
    async def caller(request: Request) -> User:
        cp = await control_plane(request)
        user = await cp.authenticator.authenticate_scope(request.scope)
        user.require(permission)
        return user

    return caller


# What a route declares, e.g. ``async def route(cp: Plane, user: Updater)``.
Plane = Annotated[ControlPlane, Depends(control_plane)]
Viewer = Annotated[User, Depends(requires(VIEW))]
Updater = Annotated[User, Depends(requires(UPDATE))]
Manager = Annotated[User, Depends(requires(MANAGE_USERS))]


# --- bodies -------------------------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    """The request's JSON body: 415 unless JSON, 413 over 1 MiB (before parsing), 400 if it
    does not parse."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            "send the body as JSON with 'Content-Type: application/json' "
            f"(got {media_type or 'none'!r})"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(
            f"the body is {declared} bytes; the limit is {MAX_BODY} bytes (1 MiB)"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise PayloadTooLarge(f"the body exceeds the limit of {MAX_BODY} bytes (1 MiB)")
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different. Duplicates are refused rather than "last one
    wins": two parsers (a proxy, an auditor, this one) could otherwise read different bodies."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in an object")
        seen[key] = value
    return seen


def parse_model(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidSchema(f"the body does not match the schema: {problems}") from None


# --- failures -----------------------------------------------------------------------------------


def error_response(exc: ClusterCertError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="clustercert"'} if exc.http_status == 401 else None
    return JSONResponse(exc.to_body(), status_code=exc.http_status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClusterCertError)
    if exc.http_status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.description)
    return error_response(exc)


async def _bad_parameter(request: Request, exc: Exception) -> JSONResponse:
    # A malformed path or query parameter. The route's requires() dependency has already
    # authenticated the caller: FastAPI solves dependencies before it validates parameters.
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(InvalidSchema(f"invalid request parameter: {problems}"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404 (no route) and 405 (no such method on a route), in our error body.
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        )
    if exc.status_code == 404:
        return error_response(
            CertificateNotFound(f"no such endpoint: {request.method} {request.url.path}")
        )
    return JSONResponse({"error_code": "http_error", "description": str(exc.detail),
                         "message": str(exc.detail)}, status_code=exc.status_code)  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    """The one mapping from failures to answers: routes raise, these answer."""
    app.add_exception_handler(ClusterCertError, _domain_error)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(StarletteHTTPException, _http_error)
