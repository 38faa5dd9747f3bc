"""The control plane's agent client (control/agents.py) against a real TLS server in-process:
which failures make the reconciler suspect a node (``on_unavailable``) and which do not."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from certfactory import CA

from clustercert.control.agents import AgentClient
from clustercert.control.state import NodeRecord
from clustercert.errors import AgentUnavailable


def _answering(tmp_path: Path, status: int, body: bytes) -> tuple[list[int], list[int]]:
    """A server answering every request with ``status`` and ``body``; calls ``trust`` on it
    (twice when it answers 404). Returns the connections it accepted (a one-element list) and
    the node ids reported unavailable."""
    ca = CA.new()
    cert, key = ca.issue("127.0.0.1", sans=["127.0.0.1"], eku=["serverAuth"]).write(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cadata=ca.cert_pem)
    reported: list[int] = []
    accepted = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        node = NodeRecord(7, "node-7", f"https://127.0.0.1:{port}", "2026-01-01T00:00:00Z")
        client = AgentClient(node, client_context, timeout=5, on_unavailable=reported.append)
        try:
            if status == 404:
                assert await client.trust(["PEM"]) is None
                assert await client.trust(["PEM"]) is None
            else:
                with pytest.raises(AgentUnavailable, match="node-7 refused trust: busy"):
                    await client.trust(["PEM"])
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())
    return accepted, reported


def test_an_agent_without_the_call_is_not_reported_unavailable(tmp_path: Path) -> None:
    # An agent that keeps no trust bundles answers 404: it is up, and the node stays known in
    # sync (its watch and kept-alive connection go on), so a rollout does not cost a new TLS
    # connection to every such node afterwards.
    accepted, reported = _answering(tmp_path, 404, b'{"error": "no route"}')
    assert reported == []
    assert accepted == [1]


def test_an_agent_refusing_a_call_is_reported_unavailable(tmp_path: Path) -> None:
    accepted, reported = _answering(tmp_path, 503, b'{"error": "busy"}')
    assert reported == [7]
    assert accepted == [1]
