"""The control plane's agent client (control/agents.py) against a real TLS server in-process:
which failures make the reconciler suspect a node (``on_unavailable``) and which do not."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from tlsserver import read_request, serve

from clustercert.control.agents import AgentClient
from clustercert.control.state import NodeRecord
from clustercert.errors import AgentUnavailable


def _answering(tmp_path: Path, status: int, body: bytes) -> tuple[int, list[int]]:
    """A server answering every request with ``status`` and ``body``; calls ``trust`` on it
    (twice when it answers 404). Returns how many connections it accepted and the node ids
    reported unavailable."""
    reported: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
            )
            await writer.drain()

    async def scenario(url: str, context: ssl.SSLContext) -> None:
        node = NodeRecord(7, "node-7", url, "2026-01-01T00:00:00Z")
        client = AgentClient(node, context, timeout=5, on_unavailable=reported.append)
        try:
            if status == 404:
                assert await client.trust(["PEM"]) is None
                assert await client.trust(["PEM"]) is None
            else:
                with pytest.raises(AgentUnavailable, match="node-7 refused trust: busy"):
                    await client.trust(["PEM"])
        finally:
            await client.aclose()

    return serve(tmp_path, answer, scenario), reported


def test_an_agent_without_the_call_is_not_reported_unavailable(tmp_path: Path) -> None:
    # An agent that keeps no trust bundles answers 404: it is up, and the node stays known in
    # sync (its watch and kept-alive connection go on), so a rollout does not cost a new TLS
    # connection to every such node afterwards.
    accepted, reported = _answering(tmp_path, 404, b'{"error": "no route"}')
    assert reported == []
    assert accepted == 1


def test_an_agent_refusing_a_call_is_reported_unavailable(tmp_path: Path) -> None:
    accepted, reported = _answering(tmp_path, 503, b'{"error": "busy"}')
    assert reported == [7]
    assert accepted == 1
