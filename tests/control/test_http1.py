"""The internode HTTP/1.1 client (control/http1.py) against a real TLS server in-process:
kept-alive reuse, a connection the server closed, chunked answers, answers that are not HTTP."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from tlsserver import Handler, read_request, serve

from clustercert.control.http1 import Connections, ProtocolError


def _run(
    tmp_path: Path, handler: Handler, scenario: Callable[[Connections], Awaitable[None]]
) -> int:
    """Serve ``handler`` over TLS, run ``scenario`` on a client of it; the connections accepted."""

    async def on_client(url: str, context: ssl.SSLContext) -> None:
        connections = Connections(url, context)
        try:
            await scenario(connections)
        finally:
            await connections.aclose()

    return serve(tmp_path, handler, on_client)


async def _echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


def test_calls_reuse_one_kept_alive_connection(tmp_path: Path) -> None:
    async def scenario(connections: Connections) -> None:
        for n in range(3):
            answer = await connections.request(
                "PUT", "/x", b'{"n": %d}' % n, connect_timeout=5, read_timeout=5
            )
            assert (answer.status, answer.body) == (200, b'{"n": %d}' % n)

    assert _run(tmp_path, _echo_forever, scenario) == 1


def test_a_connection_the_agent_closed_is_replaced_once(tmp_path: Path) -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read(1)  # then closes as soon as anything more arrives: e.g. a restart

    async def scenario(connections: Connections) -> None:
        for _ in range(2):
            answer = await connections.request("GET", "/", connect_timeout=5, read_timeout=5)
            assert answer.body == b"ok"

    assert _run(tmp_path, one_answer, scenario) == 2


def test_a_chunked_answer_is_read(tmp_path: Path) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
        )
        await writer.drain()

    async def scenario(connections: Connections) -> None:
        answer = await connections.request("GET", "/", connect_timeout=5, read_timeout=5)
        assert (answer.status, answer.body) == (409, b'{"a": 1}')

    _run(tmp_path, chunked, scenario)


def test_an_answer_that_is_not_http_is_a_protocol_error(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()

    async def scenario(connections: Connections) -> None:
        with pytest.raises(ProtocolError, match=r"not an HTTP/1\.1 status line: b'SSH-2\.0"):
            await connections.request("GET", "/", connect_timeout=5, read_timeout=5)

    _run(tmp_path, garbage, scenario)


def test_a_silent_agent_times_out(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def scenario(connections: Connections) -> None:
        with pytest.raises(TimeoutError):
            await connections.request("GET", "/", connect_timeout=5, read_timeout=0.2)

    _run(tmp_path, silent, scenario)
