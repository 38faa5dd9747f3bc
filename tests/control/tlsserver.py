"""A real TLS server in-process, for the tests of the control plane's internode clients
(test_http1.py: the HTTP/1.1 client; test_agents.py: the agent client on top of it): a
throwaway CA, a listener on 127.0.0.1, one handler per accepted connection."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from certfactory import CA

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Scenario = Callable[[str, ssl.SSLContext], Awaitable[None]]


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CA.new()
    cert, key = ca.issue("127.0.0.1", sans=["127.0.0.1"], eku=["serverAuth"]).write(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cadata=ca.cert_pem)
    return server, client


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length; its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return await reader.readexactly(length)


def serve(tmp_path: Path, handler: Handler, scenario: Scenario) -> int:
    """Serve ``handler`` over TLS on a free port and run ``scenario`` with the server's URL and
    a client context trusting it; return how many connections the server accepted."""
    server_context, client_context = _contexts(tmp_path)
    accepted = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        try:
            await scenario(f"https://127.0.0.1:{port}", client_context)
        finally:
            server.close()

    asyncio.run(main())
    return accepted
