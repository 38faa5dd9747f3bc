"""The control plane's client for node agents: mutual TLS, kept-alive connections, one per node.

httpx errors never leave this module: they become :class:`AgentUnavailable` naming the node,
the step and the cause; so does an answer that is not the expected
:mod:`clustercert.internode` message. The coordinator and the reconciler depend only on the
:class:`Agents` and :class:`NodeAgent` protocols, which :class:`AgentPool` implements over HTTPS
(and an in-process fake implements in tests).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from clustercert.control.state import NodeRecord
from clustercert.errors import AgentUnavailable
from clustercert.internode import (
    AbortAnswer,
    CommitAnswer,
    MessageError,
    RemoveAnswer,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
)

__all__ = ["AgentClient", "AgentPool", "Agents", "NodeAgent", "internode_client_context"]

Answer = TypeVar("Answer")


class NodeAgent(Protocol):
    """The internode calls on one node. Each raises AgentUnavailable when the node cannot be
    reached, refuses, or answers something that is not the expected message."""

    async def status(self, probe: bool = False) -> StatusAnswer: ...

    async def watch(self, boot_id: str | None, wait: float) -> StatusAnswer:
        """The node's status after about ``wait`` seconds, sooner if its agent is not the
        incarnation ``boot_id`` (a long-poll). Raises AgentUnavailable when the agent stops or
        the connection drops meanwhile."""
        ...

    async def stage(
        self, name: str, generation: int, certificate: str, key: str | None
    ) -> None: ...

    async def commit(self, name: str, generation: int) -> CommitAnswer: ...

    async def abort(self, name: str, generation: int) -> None: ...

    async def remove(self, name: str) -> None: ...


class Agents(Protocol):
    """Every node's agent, by node: what the coordinator and the reconciler talk to."""

    async def client(self, node: NodeRecord) -> NodeAgent: ...


def internode_client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Trust only the internal CA; present the control plane's clientAuth identity."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


# A watch keeps a connection idle for minutes: the kernel's keepalive probes notice a peer that
# vanished without closing it (its host lost power, a partition) within about a minute.
_KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


class AgentClient:
    def __init__(
        self,
        node: NodeRecord,
        context: ssl.SSLContext,
        timeout: float,
        on_unavailable: Callable[[int], None] | None = None,
    ) -> None:
        self.node = node
        self.timeout = timeout
        self._on_unavailable = on_unavailable
        # The transport alone (httpx's public transport API): the client layers above it
        # (cookies, auth, redirects, event hooks) cost a third of the control plane's CPU
        # per call and serve no purpose between control plane and agents.
        self._transport = httpx.AsyncHTTPTransport(
            verify=context,
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=60),
            socket_options=_KEEPALIVE,
        )
        self._timeouts = httpx.Timeout(timeout).as_dict()

    async def _call(
        self,
        step: str,
        method: str,
        path: str,
        parse: Callable[[object], Answer],
        body: dict[str, Any] | None = None,
        wait: float = 0.0,
    ) -> Answer:
        """One call; ``wait``: seconds the agent may hold the answer back (a watch), on top of
        the usual timeout. Any failure is reported to ``on_unavailable`` before it is raised."""
        timeouts = self._timeouts
        if wait:
            timeouts = httpx.Timeout(self.timeout, read=self.timeout + wait).as_dict()
        request = httpx.Request(
            method, self.node.agent_url + path, json=body, extensions={"timeout": timeouts}
        )
        try:
            return await self._exchange(step, request, parse)
        except AgentUnavailable:
            if self._on_unavailable is not None:
                self._on_unavailable(self.node.node_id)
            raise

    async def _exchange(
        self, step: str, request: httpx.Request, parse: Callable[[object], Answer]
    ) -> Answer:
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
            answer: object = response.json()
        except ValueError:
            answer = {"error": response.text[:200]}
        if response.status_code != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise AgentUnavailable(f"{self.node.name} refused {step}: {error or answer}")
        try:
            return parse(answer)
        except MessageError as exc:
            raise AgentUnavailable(f"{self.node.name} answered {step} with {exc}") from exc

    async def status(self, probe: bool = False) -> StatusAnswer:
        return await self._call(
            "status",
            "GET",
            f"/internal/status?probe={str(probe).lower()}",
            StatusAnswer.from_json,
        )

    async def watch(self, boot_id: str | None, wait: float) -> StatusAnswer:
        query = f"wait={wait:.1f}" + (f"&boot={boot_id}" if boot_id else "")
        return await self._call(
            "watch", "GET", f"/internal/status?{query}", StatusAnswer.from_json, wait=wait
        )

    async def stage(self, name: str, generation: int, certificate: str, key: str | None) -> None:
        await self._call(
            f"stage of {name} generation {generation}",
            "PUT",
            Target(name, generation).path,
            StageAnswer.from_json,
            StageRequest(certificate, key).to_json(),
        )

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        return await self._call(
            f"commit of {name} generation {generation}",
            "POST",
            Target(name, generation).path + "/commit",
            CommitAnswer.from_json,
        )

    async def abort(self, name: str, generation: int) -> None:
        await self._call(
            f"abort of {name} generation {generation}",
            "DELETE",
            Target(name, generation).path,
            AbortAnswer.from_json,
        )

    async def remove(self, name: str) -> None:
        await self._call(
            f"removal of {name}",
            "DELETE",
            f"/internal/certificates/{name}",
            RemoveAnswer.from_json,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


class AgentPool:
    """One :class:`AgentClient` per node, reused across rollouts (keep-alive).

    ``on_unavailable(node_id)`` is told of every call that fails (unreachable, refused, a
    malformed answer), whoever made it: the reconciler then no longer takes that node to be
    in sync (docs/decisions.md, "Node status without polling")."""

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float,
        on_unavailable: Callable[[int], None] | None = None,
    ) -> None:
        self.context = context
        self.timeout = timeout
        self.on_unavailable = on_unavailable
        self._clients: dict[int, AgentClient] = {}

    async def client(self, node: NodeRecord) -> AgentClient:
        existing = self._clients.get(node.node_id)
        if existing is not None and existing.node.agent_url == node.agent_url:
            return existing
        if existing is not None:
            await existing.aclose()
        client = AgentClient(node, self.context, self.timeout, self._unavailable)
        self._clients[node.node_id] = client
        return client

    def _unavailable(self, node_id: int) -> None:
        if self.on_unavailable is not None:
            self.on_unavailable(node_id)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
