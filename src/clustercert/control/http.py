"""The HTTP edge shared by every router: reading a JSON body within limits, parsing it into a
model, and the one error body (DESIGN §4.3)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from clustercert.errors import (
    ClusterCertError,
    InvalidJSON,
    InvalidSchema,
    PayloadTooLarge,
    UnsupportedMediaType,
)

__all__ = ["MAX_BODY", "error_response", "parse_model", "read_json"]

MAX_BODY = 1024 * 1024
_M = TypeVar("_M", bound=BaseModel)


def error_response(exc: ClusterCertError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="clustercert"'} if exc.http_status == 401 else None
    return JSONResponse(exc.to_body(), status_code=exc.http_status, headers=headers)


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
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None


def parse_model(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidSchema(f"the body does not match the schema: {problems}") from None
