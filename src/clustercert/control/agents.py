"""The control plane's client for node agents: mutual TLS, kept-alive connections, one per node.

httpx errors never leave this module: they become :class:`AgentUnavailable` naming the node,
the step and the cause.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

from clustercert.control.state import NodeRecord
from clustercert.errors import AgentUnavailable

__all__ = ["AgentClient", "AgentPool", "internode_client_context"]


def internode_client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Trust only the internal CA; present the control plane's clientAuth identity."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class AgentClient:
    def __init__(self, node: NodeRecord, context: ssl.SSLContext, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        # The transport alone (httpx's public transport API): the client layers above it
        # (cookies, auth, redirects, event hooks) cost a third of the control plane's CPU
        # per call and serve no purpose between control plane and agents.
        self._transport = httpx.AsyncHTTPTransport(
            verify=context,
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=60),
        )
        self._timeouts = httpx.Timeout(timeout).as_dict()

    async def _call(
        self, step: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        request = httpx.Request(
            method, self.node.agent_url + path, json=body, extensions={"timeout": self._timeouts}
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise AgentUnavailable(
                f"{self.node.name} ({self.node.agent_url}) did not answer {step} within "
                f"{self.timeout} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise AgentUnavailable(
                f"{self.node.name} ({self.node.agent_url}) unreachable during {step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            answer: dict[str, Any] = response.json()
        except ValueError:
            answer = {"error": response.text[:200]}
        if response.status_code != 200:
            raise AgentUnavailable(
                f"{self.node.name} refused {step}: {answer.get('error') or answer}"
            )
        return answer

    async def status(self, probe: bool = False) -> dict[str, Any]:
        return await self._call("status", "GET", f"/internal/status?probe={str(probe).lower()}")

    async def stage(self, name: str, generation: int, certificate: str, key: str | None) -> None:
        await self._call(
            f"stage of {name} generation {generation}",
            "PUT",
            f"/internal/certificates/{name}/{generation}",
            {"certificate": certificate, "key": key},
        )

    async def commit(self, name: str, generation: int) -> dict[str, Any]:
        return await self._call(
            f"commit of {name} generation {generation}",
            "POST",
            f"/internal/certificates/{name}/{generation}/commit",
        )

    async def abort(self, name: str, generation: int) -> None:
        await self._call(
            f"abort of {name} generation {generation}",
            "DELETE",
            f"/internal/certificates/{name}/{generation}",
        )

    async def remove(self, name: str) -> None:
        await self._call(f"removal of {name}", "DELETE", f"/internal/certificates/{name}")

    async def aclose(self) -> None:
        await self._transport.aclose()


class AgentPool:
    """One :class:`AgentClient` per node, reused across rollouts (keep-alive)."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout
        self._clients: dict[int, AgentClient] = {}

    async def client(self, node: NodeRecord) -> AgentClient:
        existing = self._clients.get(node.node_id)
        if existing is not None and existing.node.agent_url == node.agent_url:
            return existing
        if existing is not None:
            await existing.aclose()
        client = AgentClient(node, self.context, self.timeout)
        self._clients[node.node_id] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
