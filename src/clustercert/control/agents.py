"""The control plane's client for node agents: mutual TLS, kept-alive connections, one per node.

The calls go over :mod:`.http1` (kept-alive HTTP/1.1 on the event loop's TLS). Its errors never
leave this module: they become :class:`AgentUnavailable` naming the node, the step and the
cause; so does an answer that is not the expected
:mod:`clustercert.internode` message. The coordinator and the reconciler depend only on the
:class:`Agents` and :class:`NodeAgent` protocols, which :class:`AgentPool` implements over HTTPS
(and an in-process fake implements in tests).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from clustercert.control.http1 import Connections, ProtocolError
from clustercert.control.state import NodeRecord
from clustercert.errors import AgentUnavailable
from clustercert.internode import (
    AbortAnswer,
    CaAnswer,
    CaRequest,
    CommitAnswer,
    CsrAnswer,
    IdentityAnswer,
    IdentityRequest,
    MessageError,
    RemoveAnswer,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
    TrustAnswer,
    TrustRequest,
)

__all__ = ["AgentClient", "AgentPool", "Agents", "NodeAgent", "internode_client_context"]

Answer = TypeVar("Answer")

# Internode calls in flight at once (AgentPool): enough to keep the event loop busy, far below
# a large fleet's node count.
MAX_CALLS = 128


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

    async def trust(self, roots: Sequence[str]) -> TrustAnswer | None: ...


class Agents(Protocol):
    """Every node's agent, by node: what the coordinator and the reconciler talk to."""

    async def client(self, node: NodeRecord) -> NodeAgent: ...

    async def forget(self, node_id: int) -> None:
        """The node left the cluster: drop (and close) what talks to it."""
        ...


def internode_client_context(
    ca_file: Path | None, cert_file: Path, key_file: Path, ca_pem: str | None = None
) -> ssl.SSLContext:
    """Trust only the internal CA (``ca_file``, or the certificates of ``ca_pem``); present the
    control plane's clientAuth identity."""
    ctx = ssl.create_default_context(
        cafile=str(ca_file) if ca_file is not None else None, cadata=ca_pem
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class _NoSuchCall(AgentUnavailable):
    """The agent answered 404: it does not know the call (an older agent)."""


class AgentClient:
    def __init__(
        self,
        node: NodeRecord,
        context: ssl.SSLContext,
        timeout: float,
        on_unavailable: Callable[[int], None] | None = None,
        on_call: Callable[[str], None] | None = None,
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.node = node
        self.timeout = timeout
        self._on_unavailable = on_unavailable
        self._on_call = on_call
        self._gate = gate
        self._connections = Connections(node.agent_url, context, keepalive_expiry=60)

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
        the usual timeout. Any failure is reported to ``on_unavailable`` before it is raised,
        except a 404: an agent that answers it is up, it only lacks the call (an older one);
        reporting it would make the reconciler drop the node's watch and ask it again."""
        if self._on_call is not None:
            self._on_call(step)
        try:
            if wait or self._gate is None:  # a watch waits on the agent, not on us: no gate
                return await self._exchange(step, method, path, parse, body, wait)
            async with self._gate:
                return await self._exchange(step, method, path, parse, body, wait)
        except _NoSuchCall:
            raise
        except AgentUnavailable:
            if self._on_unavailable is not None:
                self._on_unavailable(self.node.node_id)
            raise

    async def _exchange(
        self,
        step: str,
        method: str,
        path: str,
        parse: Callable[[object], Answer],
        body: dict[str, Any] | None,
        wait: float,
    ) -> Answer:
        data = json.dumps(body).encode() if body is not None else b""
        try:
            response = await self._connections.request(
                method, path, data, connect_timeout=self.timeout, read_timeout=self.timeout + wait
            )
        except TimeoutError as exc:
            raise AgentUnavailable(
                f"{self.node.name} ({self.node.agent_url}) did not answer {step} within "
                f"{self.timeout} s"
            ) from exc
        except (OSError, EOFError, ValueError, ProtocolError, asyncio.LimitOverrunError) as exc:
            raise AgentUnavailable(
                f"{self.node.name} ({self.node.agent_url}) unreachable during {step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            answer: object = json.loads(response.body)
        except ValueError:
            answer = {"error": response.body[:200].decode(errors="replace")}
        if response.status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            refused = _NoSuchCall if response.status == 404 else AgentUnavailable
            raise refused(f"{self.node.name} refused {step}: {error or answer}")
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

    async def trust(self, roots: Sequence[str]) -> TrustAnswer | None:
        """Pin ``roots``; None from an agent that keeps no trust bundles (an older one, which
        answers 404: its redis trusts what it was configured with)."""
        try:
            return await self._call(
                "trust",
                "PUT",
                "/internal/trust",
                TrustAnswer.from_json,
                TrustRequest(tuple(roots)).to_json(),
            )
        except _NoSuchCall:
            return None

    # --- internal CA rotation (control/carotation.py) -------------------------------------

    async def set_ca(self, certificates: Sequence[str]) -> CaAnswer:
        """Make ``certificates`` the node's internal CA bundle; the answer proves it."""
        return await self._call(
            "internal CA bundle",
            "PUT",
            "/internal/ca",
            CaAnswer.from_json,
            CaRequest(tuple(certificates)).to_json(),
        )

    async def identity_csr(self) -> CsrAnswer:
        """A CSR for the node's next internode identity (its key stays on the node)."""
        return await self._call(
            "identity CSR", "POST", "/internal/identity/csr", CsrAnswer.from_json, {}
        )

    async def set_identity(self, certificate: str) -> IdentityAnswer:
        """Install the node's signed next identity; the answer names what it now serves."""
        return await self._call(
            "identity",
            "PUT",
            "/internal/identity",
            IdentityAnswer.from_json,
            IdentityRequest(certificate).to_json(),
        )

    def use_context(self, context: ssl.SSLContext) -> None:
        """New connections use ``context``; open ones keep the identity they were made with."""
        self._connections.context = context

    async def aclose(self) -> None:
        await self._connections.aclose()


class AgentPool:
    """One :class:`AgentClient` per node, reused across rollouts (keep-alive).

    ``on_unavailable(node_id)`` is told of every call that fails (unreachable, refused, a
    malformed answer), whoever made it: the reconciler then no longer takes that node to be
    in sync (docs/decisions.md, "Node status without polling"). ``on_call(step)`` counts
    every call (the metrics).

    At most ``max_calls`` calls (watches aside) are in flight at once, over all nodes: a
    rollout to 1,000 nodes otherwise holds 1,000 requests, answers and TLS connections' buffers
    at the same moment (the control plane's memory peak, docs/benchmarks.md), for no speed: one
    event loop handles them one after another anyway. A call waiting for the gate does not run
    down its timeout."""

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float,
        on_unavailable: Callable[[int], None] | None = None,
        on_call: Callable[[str], None] | None = None,
        max_calls: int = MAX_CALLS,
    ) -> None:
        self.context = context
        self.timeout = timeout
        self.on_unavailable = on_unavailable
        self.on_call = on_call
        self._gate = asyncio.Semaphore(max_calls)
        self._clients: dict[int, AgentClient] = {}

    async def client(self, node: NodeRecord) -> AgentClient:
        existing = self._clients.get(node.node_id)
        if existing is not None and existing.node.agent_url == node.agent_url:
            return existing
        if existing is not None:
            await existing.aclose()
        client = AgentClient(
            node, self.context, self.timeout, self._unavailable, self.on_call, self._gate
        )
        self._clients[node.node_id] = client
        return client

    async def forget(self, node_id: int) -> None:
        """Close and drop the node's client (it left the cluster): nothing calls it again."""
        client = self._clients.pop(node_id, None)
        if client is not None:
            await client.aclose()

    def use_context(self, context: ssl.SSLContext) -> None:
        """Connect with ``context`` from now on (the internal CA rotation changes the identity
        presented and the CAs trusted); kept-alive connections and watches go on as they are."""
        self.context = context
        for client in self._clients.values():
            client.use_context(context)

    def _unavailable(self, node_id: int) -> None:
        if self.on_unavailable is not None:
            self.on_unavailable(node_id)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
