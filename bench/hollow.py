"""Hollow nodes: a LOAD GENERATOR for ``make bench-scale`` (kubemark's idea), not an agent.

One process plays K nodes on K loopback ports. Towards the control plane each one is a node
like any other: it joins with a real one-time token through the real join flow (its own key,
a CSR, ``POST /v1/internal/join``, the agent's own :func:`join`), serves the internode API over
real mutual TLS with the identity it was given, and reads and writes the real internode
messages (:mod:`clustercert.internode`). It answers stage, commit, status, abort, remove and
trust as an agent does (same idempotency, same refusals, same status).

What it does NOT do: it keeps the staged files in memory, reloads nothing and proves nothing.
Its commit answers with a *synthetic* proof: the fingerprint of the leaf it was sent; it pins
the roots it is sent but keeps no trust bundle (as an agent without redis). So it
measures what the control plane pays per node, and never what an agent does; no figure taken
with it may be quoted as an agent's behaviour (docs/benchmarks.md).

    .venv/bin/python -m bench.hollow < SPEC.json

The spec (JSON on standard input): ``{"api_url", "ca_file", "work_dir",
"nodes": [{"name", "token"}]}``. When every node has joined, one JSON line goes to standard
output: ``{"nodes": [{"name", "node_id", "port"}]}``. It then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from clustercert.agent.app import Identity, internode_server_context, join
from clustercert.agent.config import AgentConfig
from clustercert.internode import (
    MAX_WATCH_SECONDS,
    AbortAnswer,
    CertificateStatus,
    CommitAnswer,
    MessageError,
    RemoveAnswer,
    ServiceProof,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
    TrustAnswer,
    TrustRequest,
    certificate_name,
)

__all__ = ["HollowNode", "main"]

_JOIN_CONCURRENCY = 8  # joins at once: each costs the control plane a CSR signature and writes
_KEEP = 2  # generations kept per name, as the agent's files keep them
_REASONS = {200: b"OK", 404: b"Not Found", 409: b"Conflict", 422: b"Unprocessable Entity"}


class Refused(Exception):
    """The node refuses a request, as an agent would: the status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def leaf_fingerprint(chain_pem: str) -> str:
    """SHA-256 of the first certificate of a PEM chain (the leaf), from its base64 body."""
    body = chain_pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END", 1)[0]
    return hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest()


@dataclass
class _Generation:
    certificate: str
    key: str | None
    fingerprint: str


@dataclass
class HollowNode:
    """One node's internode API over certificate files kept in memory."""

    name: str
    node_id: int = 0
    generations: dict[str, dict[int, _Generation]] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    boot_id: str = field(default_factory=lambda: secrets.token_hex(8))
    pinned: tuple[str, ...] = ()  # SHA-256 fingerprints of the roots pinned (PUT /internal/trust)

    def status(self) -> StatusAnswer:
        certificates = {}
        for name, held in sorted(self.generations.items()):
            generation = self.current.get(name)
            certificates[name] = CertificateStatus(
                generation=generation,
                fingerprint=held[generation].fingerprint if generation is not None else None,
                staged=tuple(sorted(g for g in held if g != generation)),
            )
        return StatusAnswer(
            self.node_id,
            self.name,
            certificates,
            None,
            pinned=self.pinned,
            boot_id=self.boot_id,
            etcd_member=False,
        )

    async def watch(self, boot_id: str | None, wait: float) -> StatusAnswer:
        if boot_id == self.boot_id:
            await asyncio.sleep(min(wait, MAX_WATCH_SECONDS))
        return self.status()

    def stage(self, target: Target, request: StageRequest) -> StageAnswer:
        held = self.generations.setdefault(target.name, {})
        existing = held.get(target.generation)
        same = existing is not None and (existing.certificate, existing.key) == (
            request.certificate,
            request.key,
        )
        if existing is not None and not same and self.current.get(target.name) == target.generation:
            raise Refused(
                409, f"{target.name} generation {target.generation} is current and differs"
            )
        if not same:
            try:
                fingerprint = leaf_fingerprint(request.certificate)
            except (IndexError, ValueError) as exc:
                raise Refused(422, f"the pair does not load: {exc}") from None
            held[target.generation] = _Generation(request.certificate, request.key, fingerprint)
        return StageAnswer(target.name, target.generation)

    def commit(self, target: Target) -> CommitAnswer:
        held = self.generations.get(target.name, {})
        staged = held.get(target.generation)
        if staged is None:
            raise Refused(422, f"{target.name} generation {target.generation} is not staged")
        self.current[target.name] = target.generation
        for old in sorted(g for g in held if g < target.generation)[: -(_KEEP - 1) or None]:
            del held[old]
        proof = ServiceProof("hollow", target.name, True, staged.fingerprint)  # synthetic
        return CommitAnswer(target.name, target.generation, staged.fingerprint, True, (proof,))

    def abort(self, target: Target) -> AbortAnswer:
        if self.current.get(target.name) != target.generation:
            self.generations.get(target.name, {}).pop(target.generation, None)
        return AbortAnswer(target.name, target.generation)

    def trust(self, request: TrustRequest) -> TrustAnswer:
        try:
            self.pinned = tuple(sorted({leaf_fingerprint(root) for root in request.roots}))
        except (IndexError, ValueError) as exc:
            raise Refused(422, f"a root is not a PEM certificate: {exc}") from None
        return TrustAnswer(self.pinned, {})

    def remove(self, name: str) -> RemoveAnswer:
        self.generations.pop(name, None)
        self.current.pop(name, None)
        return RemoveAnswer(name)

    async def route(self, method: str, target: str, body: bytes) -> dict[str, Any]:
        """One request, as the agent's routes answer it; raises Refused."""
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        try:
            if parts == ["internal", "status"] and method == "GET":
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if "wait" in query:
                    return (await self.watch(query.get("boot"), float(query["wait"]))).to_json()
                return self.status().to_json()
            if parts == ["internal", "trust"] and method == "PUT":
                return self.trust(TrustRequest.from_json(json.loads(body))).to_json()
            if parts[:2] != ["internal", "certificates"] or len(parts) not in (3, 4, 5):
                raise Refused(404, f"no route {method} {url.path}")
            if len(parts) == 3 and method == "DELETE":
                return self.remove(certificate_name(parts[2])).to_json()
            what = Target.parse(parts[2], parts[3])
            if len(parts) == 5 and parts[4] == "commit" and method == "POST":
                return self.commit(what).to_json()
            if len(parts) == 4 and method == "PUT":
                return self.stage(what, StageRequest.from_json(json.loads(body))).to_json()
            if len(parts) == 4 and method == "DELETE":
                return self.abort(what).to_json()
        except (MessageError, ValueError) as exc:
            raise Refused(422, str(exc)) from None
        raise Refused(404, f"no route {method} {url.path}")


async def _serve_connection(
    node: HollowNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """HTTP/1.1 with keep-alive and Content-Length bodies: all the control plane sends."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            try:
                status, answer = 200, await node.route(method, target, body)
            except Refused as exc:
                status, answer = exc.status, {"error": str(exc)}
            payload = json.dumps(answer).encode()
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % (status, _REASONS.get(status, b"Error"), len(payload))
                + payload
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@dataclass
class _Joined:
    node: HollowNode
    sock: socket.socket
    identity: Identity


async def _join(spec: dict[str, Any], entry: dict[str, str], gate: asyncio.Semaphore) -> _Joined:
    """Bind a port, then join through the agent's own join flow with that URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    directory = Path(spec["work_dir"]) / entry["name"]
    config = AgentConfig(
        name=entry["name"],
        data_dir=directory,
        listen=("127.0.0.1", port),
        advertise_url=f"https://127.0.0.1:{port}",
        control_plane_url=spec["api_url"],
        ca_file=Path(spec["ca_file"]),
        join_token=entry["token"],
        services=(),
    )
    async with gate:
        identity = await asyncio.to_thread(join, config, directory / "identity")
    return _Joined(HollowNode(entry["name"], identity.node_id), sock, identity)


async def run(spec: dict[str, Any]) -> None:
    gate = asyncio.Semaphore(_JOIN_CONCURRENCY)
    joined = await asyncio.gather(*(_join(spec, e, gate) for e in spec["nodes"]))
    servers = []
    for item in joined:
        node = item.node

        async def serve(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node: HollowNode = node
        ) -> None:
            await _serve_connection(node, reader, writer)

        context = internode_server_context(item.identity)
        servers.append(await asyncio.start_server(serve, sock=item.sock, ssl=context))
    ready = [
        {"name": j.node.name, "node_id": j.node.node_id, "port": j.sock.getsockname()[1]}
        for j in joined
    ]
    print(json.dumps({"nodes": ready}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> int:
    spec = json.loads(sys.stdin.read())
    asyncio.run(run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
