"""The API's HTTP listener: slow-client deadlines, bounded JSON, and the client certificate.

uvicorn gives no deadline for a request to arrive (a client may trickle its headers or its body
forever) and does not show the ASGI app the TLS peer certificate. :func:`api_protocol` makes an
h11 protocol class that:

- answers ``408 request_timeout`` (the JSON error body) and closes the connection when a request
  head is not complete ``header_timeout`` seconds after the connection opened or the request's
  first byte arrived, and closes a connection whose request body is still incomplete
  ``body_timeout`` (+ a short grace) seconds after its head (the app answers 408 first, below);
- answers malformed HTTP with a JSON ``400 bad_request`` instead of uvicorn's plain text;
- puts the client certificate into the ASGI TLS extension,
  ``scope["extensions"]["tls"]["client_cert_chain"]`` (PEM, leaf only: Python 3.11's ``ssl``
  exposes no verified chain).

:class:`RequestLimits` wraps the ASGI app: reading the body past ``body_timeout`` raises
:class:`RequestTimeout` (408), and a complete JSON body nested deeper than ``max_json_depth``
raises ``invalid_json`` (400). Both are raised from the app's own ``receive``, so they come after
authentication and permission checks, in DESIGN §4.2's order, and the one error handler answers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from clustercert.errors import BadRequest, ClusterCertError, InvalidJSON
from clustercert.tls import expose_peer_certificate

__all__ = ["ListenerLimits", "RequestLimits", "RequestTimeout", "api_protocol", "json_too_deep"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The body grace after which the listener closes a connection whose body never completed: the
# app has answered 408 by then, unless it never read the body (e.g. it answered 401 first).
_CLOSE_GRACE = 2.0


class RequestTimeout(ClusterCertError):
    error_code = "request_timeout"
    http_status = 408


@dataclass(frozen=True)
class ListenerLimits:
    header_timeout: float = 10.0
    """Seconds for a request line and headers to arrive (from connect, or the first byte)."""
    body_timeout: float = 30.0
    """Seconds for a request body to arrive, from the end of its head."""
    max_json_depth: int = 32
    """Deepest nesting of arrays/objects accepted in a JSON body (certificates need 3)."""
    max_head_bytes: int = 16 * 1024
    """Request line plus headers."""


# A JSON string (escapes included) or one bracket; possessive, so no backtracking.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_OPEN = frozenset(b"[{")


def json_too_deep(body: bytes, limit: int) -> bool:
    """True when ``body`` nests arrays/objects deeper than ``limit`` (strings are skipped, so
    brackets inside them do not count). Linear in ``len(body)``; never parses."""
    depth = 0
    for match in _TOKENS.finditer(body):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif first != 0x22:  # a closing bracket; 0x22 is '"'
            depth -= 1
    return False


def _error_bytes(status: int, reason: str, error: ClusterCertError) -> bytes:
    body = json.dumps(error.to_body()).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class RequestLimits:
    """ASGI middleware: a deadline for reading the body, and a JSON nesting bound."""

    def __init__(self, app: ASGIApp, limits: ListenerLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        deadline = time.monotonic() + limits.body_timeout
        body = bytearray()
        done = False
        is_json = any(
            name == b"content-type" and value.split(b";")[0].strip().lower() == b"application/json"
            for name, value in scope.get("headers") or ()
        )

        async def limited_receive() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {limits.body_timeout:g} s; send it "
                    "without pauses"
                ) from None
            if message["type"] != "http.request":
                done = True
                return message
            if is_json and len(body) <= 1024 * 1024:
                body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                done = True
                if is_json and json_too_deep(bytes(body), limits.max_json_depth):
                    raise InvalidJSON(
                        f"the body nests JSON arrays/objects deeper than {limits.max_json_depth} "
                        "levels"
                    )
            return message

        await self.app(scope, limited_receive, send)


# Well below h11's limit on an incomplete request head (16 KiB, which uvicorn keeps).
_FEED_BYTES = 8 * 1024


def api_protocol(limits: ListenerLimits) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn (``uvicorn.Config(http=...)``) enforcing ``limits``."""

    class ApiProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            expose_peer_certificate(self, transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # h11 refuses a head over its size limit only while the head is still incomplete:
            # one that arrives whole in a single read (a busy server reads late) would pass.
            # Fed in pieces below the limit, every oversized head is refused alike.
            for start in range(0, len(data), _FEED_BYTES):
                if self.transport.is_closing():
                    return
                self._feed(data[start : start + _FEED_BYTES])

        def _feed(self, data: bytes) -> None:
            waiting_for_head = self.conn.their_state is h11.IDLE
            if waiting_for_head and self._head_timer is None:
                self._arm_head_timer()
            super().data_received(data)
            state = self.conn.their_state
            if state is not h11.IDLE and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
                if state is h11.SEND_BODY:
                    self._body_timer = self.loop.call_later(
                        limits.body_timeout + _CLOSE_GRACE, self._body_expired
                    )
            if state is not h11.SEND_BODY and self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_expired)

        def _cancel_timers(self) -> None:
            for timer in (self._head_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._body_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a response is being produced; the keep-alive logic takes over
            error = RequestTimeout(
                f"the request line and headers did not arrive within {limits.header_timeout:g} s"
            )
            self.transport.write(_error_bytes(408, "Request Timeout", error))
            self.transport.close()

        def _body_expired(self) -> None:
            self._body_timer = None
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            error = BadRequest(f"malformed HTTP request: {msg}")
            self.transport.write(_error_bytes(400, "Bad Request", error))
            self.transport.close()

    return ApiProtocol
