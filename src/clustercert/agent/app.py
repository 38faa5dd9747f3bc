"""The node agent: joins once with a token, then serves the internode API over mutual TLS.

The calls and their messages are :mod:`clustercert.internode` (only the control plane, holding
an internal-CA clientAuth certificate, may call): status (generations on disk, and what is
served), stage (check the pair, write it durably), commit (switch services, verify), abort
(remove a staged generation), remove (every file of an optional name). Requests are parsed into
those messages at the edge; one that does not match is refused with 422 and the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clustercert import pki
from clustercert.agent.config import AgentConfig, ServiceConfig
from clustercert.agent.metrics import MetricsListener, NodeLabels
from clustercert.agent.services import CommandService, RedisService, Service
from clustercert.certfiles import CertificateFiles, GenerationPaths, write_atomically
from clustercert.errors import AgentUnavailable, ConfigError
from clustercert.internode import (
    AbortAnswer,
    CertificateStatus,
    CommitAnswer,
    MessageError,
    RemoveAnswer,
    ServedFingerprint,
    ServiceProof,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
    certificate_name,
)
from clustercert.tls import server_context

__all__ = ["Agent", "Identity", "run_agent"]

log = logging.getLogger("clustercert.agent")


@dataclass(frozen=True)
class Identity:
    """The node's internal-CA identity, obtained when it joined."""

    node_id: int
    cert_file: Path
    key_file: Path
    ca_file: Path
    cluster: str = ""  # the cluster's name (empty for a node that joined before it was sent)

    @classmethod
    def load(cls, directory: Path) -> Identity | None:
        meta = directory / "node.json"
        if not meta.exists():
            return None
        raw = json.loads(meta.read_text())
        return cls(
            int(raw["node_id"]),
            directory / "cert.pem",
            directory / "key.pem",
            directory / "ca.pem",
            str(raw.get("cluster", "")),
        )


def join(config: AgentConfig, directory: Path) -> Identity:
    """Exchange the one-time token for an identity certificate. The key never leaves the node."""
    import httpx  # only a node that has not joined yet needs an HTTP client

    if not config.join_token:
        raise ConfigError("join_token: required until the node has joined")
    key = pki.new_private_key()
    body = {
        "token": config.join_token,
        "name": config.name,
        "agent_url": config.advertise_url,
        "csr": pki.make_csr(key, config.name),
    }
    verify: ssl.SSLContext | bool = True
    if config.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(config.ca_file))
    try:
        response = httpx.post(
            f"{config.control_plane_url}/v1/internal/join", json=body, verify=verify, timeout=30
        )
    except httpx.HTTPError as exc:
        raise AgentUnavailable(
            f"cannot reach the control plane at {config.control_plane_url}: {exc}"
        ) from exc
    if response.status_code != 200:
        raise ConfigError(f"the control plane refused to join this node: {response.text}")
    answer = response.json()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(directory / "key.pem", pki.key_to_pem(key).encode())
    write_atomically(directory / "cert.pem", answer["certificate"].encode(), 0o644)
    write_atomically(directory / "ca.pem", answer["ca_certificate"].encode(), 0o644)
    meta = {"node_id": answer["node_id"], "cluster": answer.get("cluster_name", "")}
    write_atomically(directory / "node.json", json.dumps(meta).encode())
    identity = Identity.load(directory)
    assert identity is not None
    log.info("joined the cluster as node %s (%s)", answer["node_id"], config.name)
    return identity


def _leaf_fingerprint(cert_pem: str) -> str:
    return pki.fingerprint_sha256(x509.load_pem_x509_certificates(cert_pem.encode())[0])


class Agent:
    """Node-local truth: the files on disk and what each service serves."""

    def __init__(self, config: AgentConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.files = CertificateFiles(config.data_dir)
        self.services: list[Service] = [self._service(s) for s in config.services]
        self._lock = asyncio.Lock()
        self._fingerprints: dict[tuple[str, int], str] = {}

    def _service(self, config: ServiceConfig) -> Service:
        if config.type == "redis":
            return RedisService(
                config, self.config.probe_timeout, self.identity.ca_file, self.config.data_dir
            )
        if config.type == "metrics":
            identity = {
                "node_identity": self.identity.cert_file,
                "internal_ca": self.identity.ca_file,
            }
            labels = NodeLabels(self.identity.cluster, str(self.identity.node_id), identity)
            return MetricsListener(
                config, self.config.probe_timeout, self.files, self.identity.ca_file, labels
            )
        return CommandService(config, self.config.probe_timeout)

    def current_paths(self) -> dict[str, GenerationPaths]:
        current: dict[str, GenerationPaths] = {}
        for name in self.files.names():
            generation = self.files.current(name)
            paths = self.files.paths(name, generation) if generation is not None else None
            if paths is not None:
                current[name] = paths
        return current

    async def start(self) -> None:
        current = self.current_paths()
        for service in self.services:
            try:
                await service.start(current)
            except Exception:
                log.exception(
                    "service %s did not start; it will start on the next commit", service.name
                )

    async def stop(self) -> None:
        for service in self.services:
            await service.stop()

    def _fingerprint(self, name: str, paths: GenerationPaths) -> str:
        """The leaf's SHA-256, parsed once per generation: generations are immutable, and the
        reconciler asks for the status of every node every second."""
        key = (name, paths.generation)
        if key not in self._fingerprints:
            self._fingerprints[key] = _leaf_fingerprint(paths.cert.read_text())
        return self._fingerprints[key]

    async def status(self, probe: bool) -> StatusAnswer:
        certificates: dict[str, CertificateStatus] = {}
        current = self.current_paths()
        for name in self.files.names():
            paths = current.get(name)
            generation = paths.generation if paths else None
            services = None
            if probe:
                services = tuple(
                    [
                        ServedFingerprint(s.name, await s.served(name))
                        for s in self.services
                        if name in s.certificates()
                    ]
                )
            certificates[name] = CertificateStatus(
                generation,
                self._fingerprint(name, paths) if paths else None,
                tuple(g for g in self.files.generations(name) if g != generation),
                services,
            )
        redis_pids = [s.pid() for s in self.services if isinstance(s, RedisService)]
        return StatusAnswer(
            self.identity.node_id,
            self.config.name,
            certificates,
            redis_pids[0] if redis_pids else None,
        )

    async def stage(self, name: str, generation: int, body: StageRequest) -> StageAnswer:
        """Write the pair durably as ``generation`` once it loads into a TLS context (checked
        before the files take their final name: a pair that does not match never lands)."""
        async with self._lock:
            self.files.stage(name, generation, body.certificate, body.key, check=_loads_together)
            return StageAnswer(name, generation)

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        async with self._lock:
            try:
                paths = self.files.activate(name, generation)
            except FileNotFoundError as exc:
                raise StageRejected(str(exc)) from exc
            expected = self._fingerprint(name, paths)
            results: list[ServiceProof] = []
            for service in self.services:
                if name in service.certificates():
                    results.append(await service.apply(name, paths, expected))
            ok = all(r.ok for r in results)
            log.info(
                "commit %s generation %d: %s",
                name, generation, "verified" if ok else "FAILED " + "; ".join(
                    r.error or "" for r in results if not r.ok
                ),
            )  # fmt: skip
            return CommitAnswer(name, generation, expected, ok, tuple(results))

    async def abort(self, name: str, generation: int) -> AbortAnswer:
        async with self._lock:
            self.files.discard(name, generation)
            return AbortAnswer(name, generation)

    async def remove(self, name: str) -> RemoveAnswer:
        async with self._lock:
            self.files.remove(name)
            self._fingerprints = {k: v for k, v in self._fingerprints.items() if k[0] != name}
            return RemoveAnswer(name)


class StageRejected(Exception):
    """The node refuses a stage or commit request; the message says why."""


def _loads_together(paths: GenerationPaths) -> None:
    """Raise StageRejected unless the certificate and key load into one TLS server context."""
    if paths.key is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths.cert, paths.key)
    except (ssl.SSLError, OSError) as exc:
        raise StageRejected(f"the pair does not load into a TLS context: {exc}") from exc


def build_app(agent: Agent) -> Starlette:
    """The internode API on bare Starlette: five routes need neither FastAPI's dependency
    injection nor pydantic, which cost the agent ~15 MB of memory and CPU on every call."""

    def target(request: Request) -> Target:
        return Target.parse(request.path_params["name"], request.path_params["generation"])

    def answer(
        message: StatusAnswer | StageAnswer | CommitAnswer | AbortAnswer | RemoveAnswer,
    ) -> JSONResponse:
        return JSONResponse(message.to_json())

    async def status(request: Request) -> JSONResponse:
        probe = request.query_params.get("probe", "false").lower() in ("true", "1")
        return answer(await agent.status(probe))

    async def stage(request: Request) -> JSONResponse:
        where = target(request)
        try:
            data = json.loads(await request.body())
        except ValueError as exc:
            raise MessageError(f"the body is not JSON: {exc}") from None
        return answer(await agent.stage(where.name, where.generation, StageRequest.from_json(data)))

    async def commit(request: Request) -> JSONResponse:
        where = target(request)
        return answer(await agent.commit(where.name, where.generation))

    async def abort(request: Request) -> JSONResponse:
        where = target(request)
        return answer(await agent.abort(where.name, where.generation))

    async def remove(request: Request) -> JSONResponse:
        return answer(await agent.remove(certificate_name(request.path_params["name"])))

    async def rejected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    async def exists(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    return Starlette(
        routes=[
            Route("/internal/status", status, methods=["GET"]),
            Route("/internal/certificates/{name}/{generation}", stage, methods=["PUT"]),
            Route("/internal/certificates/{name}/{generation}/commit", commit, methods=["POST"]),
            Route("/internal/certificates/{name}/{generation}", abort, methods=["DELETE"]),
            Route("/internal/certificates/{name}", remove, methods=["DELETE"]),
        ],
        exception_handlers={
            StageRejected: rejected,
            MessageError: rejected,
            FileExistsError: exists,
        },
    )


def internode_server_context(identity: Identity) -> ssl.SSLContext:
    """Mutual TLS: only clients with an internal-CA certificate allowing clientAuth get in.

    Node identities allow serverAuth only, so a node cannot call another node; the control
    plane's identity allows clientAuth (see docs/decisions.md)."""
    return server_context(
        identity.cert_file, identity.key_file, client_ca=identity.ca_file, require_client=True
    )


async def _serve(config: AgentConfig) -> None:
    identity_dir = config.data_dir / "identity"
    identity = Identity.load(identity_dir)
    if identity is None:
        identity = await asyncio.to_thread(join, config, identity_dir)
    agent = Agent(config, identity)
    await agent.start()
    context = internode_server_context(identity)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(agent),
            host=config.listen[0],
            port=config.listen[1],
            ssl_context_factory=lambda _config, _default: context,
            log_level="warning",
            timeout_keep_alive=75,
        )
    )
    log.info("agent %s listening on %s", config.name, config.advertise_url)
    try:
        await server.serve()
    finally:
        await agent.stop()


def run_agent(config: AgentConfig) -> None:
    """Run until SIGINT/SIGTERM; then stop what the agent supervises."""
    asyncio.run(_serve(config))
