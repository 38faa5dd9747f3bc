"""The node agent: joins once with a token, then serves the internode API over mutual TLS.

Internode API (only the control plane, holding an internal-CA clientAuth certificate, may call):

- ``GET    /internal/status[?probe=true]``             generations on disk (and what is served)
- ``PUT    /internal/certificates/{name}/{generation}`` stage: check the pair, write it durably
- ``POST   /internal/certificates/{name}/{generation}/commit``  switch services, verify
- ``DELETE /internal/certificates/{name}/{generation}`` abort: remove a staged generation
- ``DELETE /internal/certificates/{name}``              remove every file of an optional name
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clustercert import pki
from clustercert.agent.config import AgentConfig, ServiceConfig
from clustercert.agent.metrics import MetricsListener
from clustercert.agent.services import (
    CommandService,
    LinkResult,
    RedisService,
    ReloadFailed,
    Service,
    ServiceResult,
)
from clustercert.agent.trust import chain_roots
from clustercert.certfiles import CertificateFiles, GenerationPaths, write_atomically
from clustercert.errors import AgentUnavailable, ConfigError
from clustercert.names import NAMES
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

    @classmethod
    def load(cls, directory: Path) -> Identity | None:
        meta = directory / "node.json"
        if not meta.exists():
            return None
        node_id = int(json.loads(meta.read_text())["node_id"])
        return cls(node_id, directory / "cert.pem", directory / "key.pem", directory / "ca.pem")


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
    write_atomically(directory / "node.json", json.dumps({"node_id": answer["node_id"]}).encode())
    identity = Identity.load(directory)
    assert identity is not None
    log.info("joined the cluster as node %s (%s)", answer["node_id"], config.name)
    return identity


@dataclass(frozen=True)
class StageBody:
    certificate: str
    key: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> StageBody:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StageRejected(f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"certificate", "key"}:
            raise StageRejected('the body must be {"certificate": PEM, "key": PEM or null}')
        certificate, key = data.get("certificate"), data.get("key")
        if not isinstance(certificate, str) or not (key is None or isinstance(key, str)):
            raise StageRejected("certificate must be a string, key a string or null")
        return cls(certificate, key)


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
        self._roots: dict[tuple[str, int], list[x509.Certificate]] = {}

    def _service(self, config: ServiceConfig) -> Service:
        if config.type == "redis":
            return RedisService(
                config, self.config.probe_timeout, self.identity.ca_file, self.config.data_dir
            )
        if config.type == "metrics":
            return MetricsListener(
                config, self.config.probe_timeout, self.files, self.identity.ca_file
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
        try:
            await self._refresh_trust()
        except ReloadFailed:
            log.exception("a trust bundle could not be loaded; the next stage retries")
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

    def _chain_roots(self, name: str, paths: GenerationPaths) -> list[x509.Certificate]:
        key = (name, paths.generation)
        if key not in self._roots:
            chain = x509.load_pem_x509_certificates(paths.cert.read_bytes())
            self._roots[key] = chain_roots(chain)
        return self._roots[key]

    async def _refresh_trust(self) -> list[dict[str, Any]]:
        """Point every service with a trust bundle at the roots of every generation on disk
        (current, kept, staged) of the names its peers present; see agent/trust.py.
        Raises ReloadFailed when a service refuses its new bundle."""
        answers: list[dict[str, Any]] = []
        for service in self.services:
            roots: list[x509.Certificate] = []
            for name in sorted(service.trust_names()):
                for generation in self.files.generations(name):
                    paths = self.files.paths(name, generation)
                    if paths is not None:
                        roots += self._chain_roots(name, paths)
            answer = await service.trust(roots)
            if answer is not None:
                answers.append(answer)
        return answers

    async def status(self, probe: bool) -> dict[str, Any]:
        certificates: dict[str, Any] = {}
        current = self.current_paths()
        for name in self.files.names():
            paths = current.get(name)
            generation = paths.generation if paths else None
            entry: dict[str, Any] = {
                "generation": generation,
                "fingerprint": self._fingerprint(name, paths) if paths else None,
                "staged": [g for g in self.files.generations(name) if g != generation],
            }
            if probe:
                entry["services"] = [
                    {"service": s.name, "served_fingerprint": await s.served(name)}
                    for s in self.services
                    if name in s.certificates()
                ]
            certificates[name] = entry
        redis_pids = [s.pid() for s in self.services if isinstance(s, RedisService)]
        return {
            "node_id": self.identity.node_id,
            "name": self.config.name,
            "certificates": certificates,
            "redis_pid": redis_pids[0] if redis_pids else None,
        }

    async def stage(self, name: str, generation: int, body: StageBody) -> dict[str, Any]:
        """Write the pair durably as ``generation`` once it loads into a TLS context (checked
        before the files take their final name: a pair that does not match never lands)."""
        async with self._lock:
            self.files.stage(name, generation, body.certificate, body.key, check=_loads_together)
            # Trust moves ahead of the certificates that need it: every node trusts the new
            # root once it has staged, before any node switches (DESIGN §3).
            try:
                trust = await self._refresh_trust()
            except ReloadFailed as exc:
                self.files.discard(name, generation)
                with contextlib.suppress(ReloadFailed):
                    await self._refresh_trust()
                raise StageRejected(f"the trust bundle with this root was refused: {exc}") from exc
            return {"name": name, "generation": generation, "staged": True, "trust": trust}

    async def commit(self, name: str, generation: int) -> dict[str, Any]:
        async with self._lock:
            try:
                paths = self.files.activate(name, generation)
            except FileNotFoundError as exc:
                raise StageRejected(str(exc)) from exc
            expected = self._fingerprint(name, paths)
            results: list[ServiceResult] = []
            links: list[LinkResult] = []
            for service in self.services:
                if name in service.certificates():
                    result = await service.apply(name, paths, expected)
                    results.append(result)
                    if result.ok:
                        links += await service.prove_links(name)
            # Activation pruned an old generation: its root leaves the bundles.
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()
            failures = [r.error or "" for r in results if not r.ok]
            failures += [k.error or "" for k in links if not k.ok]
            log.info(
                "commit %s generation %d: %s%s",
                name, generation, "verified" if not failures else "FAILED " + "; ".join(failures),
                "".join(f"; {k.link} relinked in {k.seconds:.3f} s" for k in links if k.ok),
            )  # fmt: skip
            return {
                "name": name,
                "generation": generation,
                "fingerprint": expected,
                "ok": not failures,
                "services": [r.as_json() for r in results],
                "links": [k.as_json() for k in links],
            }

    async def abort(self, name: str, generation: int) -> dict[str, Any]:
        async with self._lock:
            self.files.discard(name, generation)
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()
            return {"name": name, "generation": generation, "aborted": True}

    async def remove(self, name: str) -> dict[str, Any]:
        async with self._lock:
            self.files.remove(name)
            self._fingerprints = {k: v for k, v in self._fingerprints.items() if k[0] != name}
            self._roots = {k: v for k, v in self._roots.items() if k[0] != name}
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()
            return {"name": name, "removed": True}


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

    def check_name(request: Request) -> str:
        name = str(request.path_params["name"])
        if name not in NAMES:
            raise StageRejected(f"unknown certificate name {name!r}")
        return name

    def generation_of(request: Request) -> int:
        raw = str(request.path_params["generation"])
        if not raw.isdigit():
            raise StageRejected(f"generation must be a number, got {raw!r}")
        return int(raw)

    async def status(request: Request) -> JSONResponse:
        probe = request.query_params.get("probe", "false").lower() in ("true", "1")
        return JSONResponse(await agent.status(probe))

    async def stage(request: Request) -> JSONResponse:
        name, generation = check_name(request), generation_of(request)
        body = StageBody.parse(await request.body())
        return JSONResponse(await agent.stage(name, generation, body))

    async def commit(request: Request) -> JSONResponse:
        name, generation = check_name(request), generation_of(request)
        return JSONResponse(await agent.commit(name, generation))

    async def abort(request: Request) -> JSONResponse:
        name, generation = check_name(request), generation_of(request)
        return JSONResponse(await agent.abort(name, generation))

    async def remove(request: Request) -> JSONResponse:
        return JSONResponse(await agent.remove(check_name(request)))

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
        exception_handlers={StageRejected: rejected, FileExistsError: exists},
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
