"""A small HTTP/1.1 client over TLS for the internode calls: what :mod:`.agents` sends on.

It speaks the subset the internode protocol uses: one request at a time per connection,
``Content-Length`` bodies (chunked answers are read too), kept-alive connections reused up to
``keepalive_expiry`` seconds. TLS runs in the event loop's transport (uvloop: in C). httpx did
the same work through httpcore, anyio's TLS stream and h11, all in Python; at 1,000 nodes that
was 80 % of the control plane's CPU per rotation (docs/benchmarks.md, "Scale").

Failures are the standard ones: ``TimeoutError``, ``OSError`` (``ssl.SSLError`` among them) and
:class:`ProtocolError` for an answer that is not HTTP/1.1; the caller translates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Connections", "ProtocolError", "Response"]

# A watch keeps a connection idle for minutes: the kernel's keepalive probes notice a peer that
# vanished without closing it (its host lost power, a partition) within about a minute.
_KEEPALIVE = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
)
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer answered something that is not an HTTP/1.1 response we can read."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (
            now - self.idle_since < expiry
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.close()


class Connections:
    """Kept-alive HTTP/1.1 connections to one ``https://host:port`` origin."""

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext,
        *,
        keepalive_expiry: float = 60.0,
        idle_max: int = 4,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"expected an https:// URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.authority = parts.netloc
        self.context = context
        self.keepalive_expiry = keepalive_expiry
        self.idle_max = idle_max
        self._idle: list[_Connection] = []

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now, self.keepalive_expiry):
                return connection
            connection.close()
        return None

    async def _connect(self, timeout: float) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self.context, server_hostname=self.host,
                limit=_MAX_HEAD,
            ),
            timeout,
        )  # fmt: skip
        raw = writer.get_extra_info("socket")
        if raw is not None:
            for level, option, value in _KEEPALIVE:
                with contextlib.suppress(OSError):
                    raw.setsockopt(level, option, value)
        return _Connection(reader, writer)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> Response:
        """Send one request and read its answer. A kept-alive connection that turns out to be
        closed by the peer before any answer byte came back (the agent restarted meanwhile)
        is replaced by a new one once; every internode call is idempotent."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, head + body, read_timeout)
            except _Stale:
                pass
        connection = await self._connect(connect_timeout)
        try:
            return await self._exchange(connection, head + body, read_timeout)
        except _Stale as exc:
            # On a new connection this is the answer: e.g. the agent refused our certificate
            # (TLS 1.3 reports it on the first read), or it closed without answering.
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None
            raise ConnectionResetError("the agent closed the connection without answering") from exc

    async def _exchange(self, connection: _Connection, data: bytes, timeout: float) -> Response:
        done = False
        try:
            connection.writer.write(data)
            try:
                status_line = await asyncio.wait_for(connection.reader.readline(), timeout)
            except (ConnectionError, ssl.SSLError) as exc:
                raise _Stale() from exc
            if not status_line:
                raise _Stale()
            response, keep = await asyncio.wait_for(
                self._read_rest(connection.reader, status_line), timeout
            )
            done = keep
            return response
        finally:
            if done and len(self._idle) < self.idle_max:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()

    @staticmethod
    async def _read_rest(reader: asyncio.StreamReader, status_line: bytes) -> tuple[Response, bool]:
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await _read_chunked(reader)
        else:
            length = int(headers.get(b"content-length", b"0"))
            if length > _MAX_BODY:
                raise ProtocolError(f"an answer of {length} bytes is too large")
            body = await reader.readexactly(length)
        keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
        return Response(int(parts[1]), body), keep

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _Stale(Exception):
    """A kept-alive connection was closed by the peer before it answered."""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent by agents
            return b"".join(chunks)
        total += size
        if total > _MAX_BODY:
            raise ProtocolError("a chunked answer is too large")
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
