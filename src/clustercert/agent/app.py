"""The node agent: joins once with a token, then serves the internode API over mutual TLS.

The calls and their messages are :mod:`clustercert.internode` (only the control plane may call:
the TLS handshake requires an internal-CA clientAuth certificate, and every request must come
with one that carries the control plane's URI SAN, or it is answered 403): status (generations
on disk, and what is served), stage (check the pair, write it durably), commit (switch services,
verify, prove the links that use the name), abort (remove a staged generation), remove (every
file of an optional name), trust (the roots pinned in every trust bundle, agent/trust.py).
Requests are parsed into those messages at the edge; one that does not match is refused with
422 and the reason.

A status request with ``wait`` is the control plane's watch (a long-poll, see
:mod:`clustercert.internode`): the agent holds it until the wait ends, answers at once if the
caller knew another incarnation (``boot``), and refuses it (503) as soon as the agent stops, so
that a stopping agent closes its connections and the control plane learns it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from clustercert import eventloop, pki
from clustercert.agent.config import AgentConfig, ServiceConfig
from clustercert.agent.discovery import control_plane_context, explain_join_failure
from clustercert.agent.etcd import EtcdService
from clustercert.agent.identity import (
    IdentityRefused,
    ca_fingerprints,
    install,
    pending_csr,
    recover,
    write_ca,
)
from clustercert.agent.metrics import MetricsListener, NodeLabels
from clustercert.agent.services import CommandService, RedisService, ReloadFailed, Service
from clustercert.agent.trust import PinnedRoots, chain_roots
from clustercert.certfiles import CertificateFiles, GenerationPaths, write_atomically
from clustercert.errors import ConfigError
from clustercert.internode import (
    CONTROL_PLANE_URI,
    MAX_WATCH_SECONDS,
    AbortAnswer,
    CaAnswer,
    CaRequest,
    CertificateStatus,
    CommitAnswer,
    CsrAnswer,
    IdentityAnswer,
    IdentityRequest,
    LinkProof,
    MessageError,
    RemoveAnswer,
    ServedFingerprint,
    ServiceProof,
    StageAnswer,
    StageRequest,
    StatusAnswer,
    Target,
    TrustAnswer,
    TrustRequest,
    certificate_name,
    has_identity,
)
from clustercert.jointoken import JoinToken
from clustercert.tls import ReloadableServerContext, expose_peer_certificate, server_context

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
        recover(directory)  # a renewal a crash interrupted (agent/identity.py)
        raw = json.loads(meta.read_text())
        return cls(
            int(raw["node_id"]),
            directory / "cert.pem",
            directory / "key.pem",
            directory / "ca.pem",
            str(raw.get("cluster", "")),
        )


def join(config: AgentConfig, directory: Path) -> Identity:
    """Exchange the one-time token for an identity certificate. The key never leaves the node.

    Trust in the control plane comes from ``ca_file``, or from the CA the token pins
    (:mod:`clustercert.agent.discovery`), checked before the token's secret is sent."""
    import httpx  # only a node that has not joined yet needs an HTTP client

    if not config.join_token:
        raise ConfigError("join_token: required until the node has joined")
    token = JoinToken.parse(config.join_token)
    verify = control_plane_context(config, token, config.data_dir / "ca.pem")
    key = pki.new_private_key()
    body = {
        "token": token.secret,
        "name": config.name,
        "agent_url": config.advertise_url,
        "csr": pki.make_csr(key, config.name),
    }
    try:
        response = httpx.post(
            f"{config.control_plane_url}/v1/internal/join", json=body, verify=verify, timeout=30
        )
    except httpx.HTTPError as exc:
        raise explain_join_failure(exc, config.control_plane_url) from exc
    if response.status_code != 200:
        raise ConfigError(f"the control plane refused to join this node: {response.text}")
    answer = response.json()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(directory / "key.pem", pki.key_to_pem(key).encode())
    write_atomically(directory / "cert.pem", answer["certificate"].encode(), 0o644)
    write_atomically(directory / "ca.pem", answer["ca_certificate"].encode(), 0o644)
    meta = {
        "node_id": answer["node_id"],
        "agent_url": config.advertise_url,
        "cluster": answer.get("cluster_name", ""),
    }
    write_atomically(directory / "node.json", json.dumps(meta).encode())
    identity = Identity.load(directory)
    assert identity is not None
    log.info("joined the cluster as node %s (%s)", answer["node_id"], config.name)
    return identity


def joined_identity(config: AgentConfig, directory: Path) -> Identity:
    """The identity this node joined with, or a new one: on first start, and when the node's
    advertised URL changed since it joined (the control plane would still call the old one),
    which takes a new token (docs/deploy.md, "Moving a node")."""
    identity = Identity.load(directory)
    if identity is None:
        return join(config, directory)
    joined_at = json.loads((directory / "node.json").read_text()).get("agent_url")
    if joined_at in (None, config.advertise_url):
        return identity
    if not config.join_token:
        raise ConfigError(
            f"advertise_url: this node joined as {joined_at} and the control plane calls it "
            f"there, but it is now {config.advertise_url}; set join_token to a new token "
            "(`clustercert join-token` on the control plane) to join again at the new address"
        )
    log.info("advertise_url changed from %s to %s: joining again", joined_at, config.advertise_url)
    try:
        return join(config, directory)
    except ConfigError as exc:
        raise ConfigError(
            f"advertise_url changed from {joined_at} to {config.advertise_url}, and joining "
            f"again failed ({exc.description}); set join_token to a new token "
            "(`clustercert join-token` on the control plane)"
        ) from exc


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
        self.pinned = PinnedRoots(config.data_dir / "trust")
        self.boot_id = secrets.token_hex(8)  # this incarnation (StatusAnswer.boot_id)
        self.stopping = asyncio.Event()  # set when the agent begins to stop: watches end
        # The internode listener's context: swapped for new handshakes when the identity or
        # the trusted CAs change (an internal CA rotation); set once the listener is built.
        self.listener: ReloadableServerContext | None = None
        # What the status answer reports of the identity and ca.pem; only this agent changes
        # them (:meth:`_reload_listener` after each change), so they are read then, not on
        # every status call.
        self._identity_seen = self._identity_status()

    def _service(self, config: ServiceConfig) -> Service:
        if config.type == "redis":
            return RedisService(
                config, self.config.probe_timeout, self.identity.ca_file, self.config.data_dir
            )
        if config.type == "etcd":
            return EtcdService(config, self.config.probe_timeout, self.identity.ca_file)
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
        try:
            await self._refresh_trust()
        except ReloadFailed:
            log.exception(
                "a trust bundle could not be loaded; the next stage or trust call retries"
            )
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

    def _anchors(self, name: str, paths: GenerationPaths) -> str:
        """The roots a client of ``name`` trusts, for the verifying proof after a commit: the
        chain's own root when the upload carried it, else the internal CA and the roots the
        control plane pinned (the system CAs are trusted besides, see agent/probe.py)."""
        roots = self._chain_roots(name, paths) or [
            *x509.load_pem_x509_certificates(self.identity.ca_file.read_bytes()),
            *self.pinned.load(),
        ]
        return pki.certificates_to_pem(roots)

    def _chain_roots(self, name: str, paths: GenerationPaths) -> list[x509.Certificate]:
        key = (name, paths.generation)
        if key not in self._roots:
            self._roots[key] = chain_roots(x509.load_pem_x509_certificates(paths.cert.read_bytes()))
        return self._roots[key]

    def _forget(self, name: str, generation: int | None = None) -> None:
        """Drop what was parsed from ``name``'s files (one generation, or all): they are gone,
        or about to be written with other content."""
        for cache in (self._fingerprints, self._roots):
            for key in [k for k in cache if k[0] == name and generation in (None, k[1])]:
                del cache[key]

    def _check_and_remember(self, name: str) -> Callable[[GenerationPaths], None]:
        """The stage check (:func:`_pair_matches`), which also keeps what it parsed from the
        files as written: the leaf's fingerprint and the chain's roots, which the trust refresh
        after the stage and the commit need (generations are immutable once staged)."""

        def check(paths: GenerationPaths) -> None:
            chain = _pair_matches(paths)
            self._fingerprints[(name, paths.generation)] = pki.fingerprint_sha256(chain[0])
            self._roots[(name, paths.generation)] = chain_roots(chain)

        return check

    async def _refresh_trust(self, drop_now: bool = False) -> dict[str, tuple[str, ...]]:
        """Point every service with a trust bundle at: the pinned roots, and the roots of the
        current and staged generations of the names its peers present (see agent/trust.py).
        The generation kept for rollback does not count: its root stays only while pinned.
        ``drop_now``: a root that left a bundle is no longer trusted when this returns (see
        Service.trust). Returns each service's bundle (CA fingerprints); raises ReloadFailed
        when a service refuses its new bundle."""
        pinned = self.pinned.load()
        bundles: dict[str, tuple[str, ...]] = {}
        for service in self.services:
            roots = list(pinned)
            for name in sorted(service.trust_names()):
                current = self.files.current(name)
                for generation in self.files.generations(name):
                    if current is not None and generation < current:
                        continue
                    if (name, generation) in self._roots:
                        roots += self._roots[(name, generation)]
                    elif (paths := self.files.paths(name, generation)) is not None:
                        roots += self._chain_roots(name, paths)
            held = await service.trust(roots, drop_now)
            if held is not None:
                bundles[service.name] = held
        return bundles

    async def trust(self, request: TrustRequest) -> TrustAnswer:
        """Pin ``request.roots`` (replacing the pinned set) and reload every trust bundle."""
        try:
            roots = [x509.load_pem_x509_certificate(pem.encode()) for pem in request.roots]
        except ValueError as exc:
            raise MessageError(f"trust request: a root is not a PEM certificate: {exc}") from None
        async with self._lock:
            before = self.pinned.load()
            self.pinned.save(roots)
            try:
                bundles = await self._refresh_trust()
            except ReloadFailed as exc:
                # Pinned means loaded: the status must not claim roots no bundle holds.
                self.pinned.save(before)
                with contextlib.suppress(ReloadFailed):
                    await self._refresh_trust()
                raise StageRejected(f"the trust bundle was refused: {exc}") from exc
            return TrustAnswer(tuple(sorted(pki.fingerprint_sha256(r) for r in roots)), bundles)

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
            tuple(sorted(pki.fingerprint_sha256(r) for r in self.pinned.load())),
            self.boot_id,
            *self._identity_seen,
            etcd_member=any(isinstance(s, EtcdService) for s in self.services),
        )

    def _identity_status(self) -> tuple[str | None, tuple[str, ...] | None]:
        """The served identity's fingerprint and the CAs of ``ca.pem`` (None when unreadable:
        the status still answers, and the CA rotation waits for the node)."""
        try:
            return (
                _leaf_fingerprint(self.identity.cert_file.read_text()),
                ca_fingerprints(self.identity.ca_file),
            )
        except (OSError, ValueError, IndexError):
            return None, None

    # --- internal CA rotation (docs/ca-rotation.md) ------------------------------------

    def _reload_listener(self) -> None:
        """New handshakes on the internode listener get the identity and CAs on disk now, and
        the status answer reports them."""
        self._identity_seen = self._identity_status()
        if self.listener is not None:
            self.listener.reload(self.identity.cert_file, self.identity.key_file)

    async def set_ca(self, request: CaRequest) -> CaAnswer:
        """Trust exactly ``request.certificates`` as the internal CA: ``ca.pem``, the
        listener's client CAs (new handshakes), and every redis trust bundle. If a bundle is
        refused, the previous ``ca.pem`` is restored and the request refused."""
        try:
            cas = [x509.load_pem_x509_certificate(p.encode()) for p in request.certificates]
        except ValueError as exc:
            raise MessageError(f"ca request: a certificate is not PEM: {exc}") from None
        if not all(pki.is_self_signed(c) for c in cas):
            raise MessageError("ca request: every certificate must be a self-signed CA")
        async with self._lock:
            before = self.identity.ca_file.read_bytes()
            write_ca(self.identity.ca_file, cas)
            try:
                self._reload_listener()
                # A CA that leaves ca.pem is retired: no service may go on trusting it (the
                # control plane checks the bundles answered).
                bundles = await self._refresh_trust(drop_now=True)
            except (ReloadFailed, ssl.SSLError, OSError) as exc:
                write_atomically(self.identity.ca_file, before, 0o644)
                self._reload_listener()
                with contextlib.suppress(ReloadFailed):
                    await self._refresh_trust()
                raise StageRejected(f"the new internal CA bundle was refused: {exc}") from exc
            log.info("internal CA: trusting %d CA certificate(s)", len(cas))
            return CaAnswer(ca_fingerprints(self.identity.ca_file), bundles)

    async def identity_csr(self) -> CsrAnswer:
        """A CSR for the next identity (the key is made here and never leaves the node)."""
        async with self._lock:
            directory = self.identity.cert_file.parent
            csr = await asyncio.to_thread(pending_csr, directory, self.config.name)
            return CsrAnswer(csr, _leaf_fingerprint(self.identity.cert_file.read_text()))

    async def set_identity(self, request: IdentityRequest) -> IdentityAnswer:
        """Install the signed identity and serve it to new internode handshakes (open
        connections keep theirs). Idempotent."""
        async with self._lock:
            try:
                await asyncio.to_thread(
                    install, self.identity.cert_file.parent, request.certificate
                )
            except IdentityRefused as exc:
                raise StageRejected(str(exc)) from exc
            self._reload_listener()
            served = _leaf_fingerprint(self.identity.cert_file.read_text())
            log.info("internode identity is now %s", served[:16])
            return IdentityAnswer(served)

    async def watch(self, boot_id: str | None, wait: float) -> StatusAnswer:
        """The control plane's long-poll: the status once ``wait`` seconds (at most
        MAX_WATCH_SECONDS) have passed, at once when ``boot_id`` is not this incarnation's.
        Raises AgentStopping as soon as the agent begins to stop."""
        if boot_id == self.boot_id:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), min(wait, MAX_WATCH_SECONDS))
        if self.stopping.is_set():
            raise AgentStopping("the agent is stopping")
        return await self.status(probe=False)

    async def stage(self, name: str, generation: int, body: StageRequest) -> StageAnswer:
        """Write the pair durably as ``generation`` once the files written parse and match
        (checked before they take their final name: a pair that does not match never lands)."""
        async with self._lock:
            check = self._check_and_remember(name)
            try:
                self.files.stage(name, generation, body.certificate, body.key, check=check)
            except BaseException:
                self._forget(name, generation)
                raise
            # A staged root enters every bundle before any node switches (DESIGN §3).
            try:
                await self._refresh_trust()
            except ReloadFailed as exc:
                self.files.discard(name, generation)
                self._forget(name, generation)
                with contextlib.suppress(ReloadFailed):
                    await self._refresh_trust()
                raise StageRejected(f"the trust bundle with this root was refused: {exc}") from exc
            return StageAnswer(name, generation)

    async def commit(self, name: str, generation: int) -> CommitAnswer:
        async with self._lock:
            paths = self.files.paths(name, generation)
            if paths is None:
                raise StageRejected(f"{name} generation {generation} is not staged")
            expected = self._fingerprint(name, paths)
            # The durable switch of `current` (two fsyncs, in a worker thread) and the reloads
            # overlap; both end before the answer, and nobody records the node's proof before
            # the answer, so a crash in between leaves the node to the reconciler.
            switched = asyncio.create_task(
                asyncio.to_thread(self.files.activate, name, generation, prune=False)
            )
            try:
                results: list[ServiceProof] = []
                links: list[LinkProof] = []
                for service in self.services:
                    if name in service.certificates():
                        result = await service.apply(
                            name, paths, expected, self._anchors(name, paths)
                        )
                        results.append(result)
                        if result.ok:
                            links += await service.prove_links(name)
            finally:
                await switched
            answer = CommitAnswer(name, generation, expected, True, tuple(results), tuple(links))
            failures = answer.errors()
            log.info(
                "commit %s generation %d: %s%s",
                name, generation, "verified" if not failures else "FAILED " + "; ".join(failures),
                "".join(f"; {k.link} relinked in {k.seconds:.3f} s" for k in links if k.ok),
            )  # fmt: skip
            return replace(answer, ok=not failures)

    async def prune(self, name: str) -> None:
        """Delete the generations of ``name`` older than the previous one: run after a commit
        has answered, so that the rollout does not wait for it."""
        async with self._lock:
            self.files.prune(name)
            kept = set(self.files.generations(name))
            for generation in {
                k[1] for c in (self._fingerprints, self._roots) for k in c if k[0] == name
            } - kept:
                self._forget(name, generation)
            # The generation before the previous one is gone: its root may leave the bundles.
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()

    async def abort(self, name: str, generation: int) -> AbortAnswer:
        async with self._lock:
            if self.files.current(name) != generation:
                self._forget(name, generation)
            self.files.discard(name, generation)
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()
            return AbortAnswer(name, generation)

    async def remove(self, name: str) -> RemoveAnswer:
        async with self._lock:
            self.files.remove(name)
            self._forget(name)
            with contextlib.suppress(ReloadFailed):
                await self._refresh_trust()
            return RemoveAnswer(name)


class StageRejected(Exception):
    """The node refuses a stage or commit request; the message says why."""


class AgentStopping(Exception):
    """The agent is stopping: it answers no watch (503)."""


def _pair_matches(paths: GenerationPaths) -> list[x509.Certificate]:
    """Raise StageRejected unless the files as written hold certificates that parse and a key
    whose public half is the leaf's; return the certificates.

    Parsed with cryptography (its own parsers, then OpenSSL key objects): 0.05 ms, where
    loading the pair into an OpenSSL 3.0 TLS context cost 1.2 ms of every rotation; the
    control plane already ran a TLS handshake with this pair before staging it
    (docs/decisions.md, "A leaner commit on the agent"). RSA keys skip the primality check:
    the control plane ran it when it validated the upload, and matching the leaf's public key
    is what proves the pair here. The service's own load, proven by handshake, comes at commit.
    """
    try:
        certificates = x509.load_pem_x509_certificates(paths.cert.read_bytes())
        if not certificates:
            raise ValueError("no certificate")
        if paths.key is None:
            return certificates
        key = serialization.load_pem_private_key(
            paths.key.read_bytes(), None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, OSError) as exc:
        raise StageRejected(f"the pair does not load: {exc}") from exc
    if pki.spki_sha256(key.public_key()) != pki.spki_sha256(certificates[0].public_key()):
        raise StageRejected("the key does not match the certificate")
    return certificates


class OnlyControlPlane:
    """Answers 403 to every request whose client certificate lacks the control plane's URI SAN.
    The handshake already required an internal-CA clientAuth certificate, but the operator may
    issue others from that CA (a metrics scraper's): those must not stage or commit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _from_control_plane(scope):
            log.warning(
                "refused %s %s from %s: not the control plane's identity",
                scope.get("method"), scope.get("path"), (scope.get("client") or ("?",))[0],
            )  # fmt: skip
            response = JSONResponse(
                {"error": f"only the control plane ({CONTROL_PLANE_URI}) may call this agent"},
                status_code=403,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _from_control_plane(scope: Scope) -> bool:
    chain = (((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain")) or []
    return bool(chain) and _pem_has_control_plane_uri(str(chain[0]))


@functools.lru_cache(maxsize=64)
def _pem_has_control_plane_uri(pem: str) -> bool:
    # Cached: the control plane calls every node every second with the same certificate.
    return has_identity(x509.load_pem_x509_certificate(pem.encode()), CONTROL_PLANE_URI)


class InternodeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (HTTP parsing in C: a third less CPU per internode call
    than h11), showing the app the peer certificate (:class:`OnlyControlPlane`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        expose_peer_certificate(self, transport)


def build_app(agent: Agent) -> Starlette:
    """The internode API on bare Starlette: five routes need neither FastAPI's dependency
    injection nor pydantic, which cost the agent ~15 MB of memory and CPU on every call."""

    def target(request: Request) -> Target:
        return Target.parse(request.path_params["name"], request.path_params["generation"])

    def answer(
        message: StatusAnswer
        | StageAnswer
        | CommitAnswer
        | AbortAnswer
        | RemoveAnswer
        | TrustAnswer,
    ) -> JSONResponse:
        return JSONResponse(message.to_json())

    async def status(request: Request) -> JSONResponse:
        query = request.query_params
        if "wait" in query:
            try:
                wait = float(query["wait"])
            except ValueError:
                raise MessageError(
                    f"wait must be a number of seconds, got {query['wait']!r}"
                ) from None
            return answer(await agent.watch(query.get("boot"), wait))
        probe = query.get("probe", "false").lower() in ("true", "1")
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
        committed = await agent.commit(where.name, where.generation)
        return JSONResponse(committed.to_json(), background=BackgroundTask(agent.prune, where.name))

    async def abort(request: Request) -> JSONResponse:
        where = target(request)
        return answer(await agent.abort(where.name, where.generation))

    async def remove(request: Request) -> JSONResponse:
        return answer(await agent.remove(certificate_name(request.path_params["name"])))

    async def body(request: Request) -> object:
        try:
            return json.loads(await request.body())
        except ValueError as exc:
            raise MessageError(f"the body is not JSON: {exc}") from None

    async def trust(request: Request) -> JSONResponse:
        return answer(await agent.trust(TrustRequest.from_json(await body(request))))

    async def ca(request: Request) -> JSONResponse:
        request_ = CaRequest.from_json(await body(request))
        return JSONResponse((await agent.set_ca(request_)).to_json())

    async def csr(request: Request) -> JSONResponse:
        return JSONResponse((await agent.identity_csr()).to_json())

    async def identity(request: Request) -> JSONResponse:
        request_ = IdentityRequest.from_json(await body(request))
        return JSONResponse((await agent.set_identity(request_)).to_json())

    async def rejected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    async def exists(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    async def stopping(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    return Starlette(
        routes=[
            Route("/internal/status", status, methods=["GET"]),
            Route("/internal/certificates/{name}/{generation}", stage, methods=["PUT"]),
            Route("/internal/certificates/{name}/{generation}/commit", commit, methods=["POST"]),
            Route("/internal/certificates/{name}/{generation}", abort, methods=["DELETE"]),
            Route("/internal/certificates/{name}", remove, methods=["DELETE"]),
            Route("/internal/trust", trust, methods=["PUT"]),
            Route("/internal/ca", ca, methods=["PUT"]),
            Route("/internal/identity/csr", csr, methods=["POST"]),
            Route("/internal/identity", identity, methods=["PUT"]),
        ],
        exception_handlers={
            StageRejected: rejected,
            MessageError: rejected,
            FileExistsError: exists,
            AgentStopping: stopping,
        },
        middleware=[Middleware(OnlyControlPlane)],
    )


def internode_server_context(identity: Identity) -> ssl.SSLContext:
    """Mutual TLS: only clients with an internal-CA certificate allowing clientAuth get in.

    Node identities allow serverAuth only, so a node cannot call another node; the control
    plane's identity allows clientAuth (see docs/decisions.md)."""
    return server_context(
        identity.cert_file, identity.key_file, client_ca=identity.ca_file, require_client=True
    )


def internode_listener_context(identity: Identity) -> ReloadableServerContext:
    """:func:`internode_server_context`, swappable for new handshakes (an internal CA
    rotation replaces the identity and the trusted CAs without a restart)."""
    return ReloadableServerContext(
        identity.cert_file, identity.key_file, client_ca=identity.ca_file, require_client=True
    )


class _AgentServer(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises SIGTERM once ``serve()`` returns,
    which kills the process before the agent stops what it supervises: redis-server would
    outlive it; the agent handles the signals itself, :func:`_serve`), and which tells the
    agent's watches to end before it waits for open requests (they would hold it for minutes)."""

    def __init__(self, config: uvicorn.Config, agent: Agent) -> None:
        super().__init__(config)
        self.agent = agent

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.agent.stopping.set()
        await super().shutdown(sockets)


async def _serve(config: AgentConfig) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    identity = await asyncio.to_thread(joined_identity, config, config.data_dir / "identity")
    if stopping.is_set():
        return
    agent = Agent(config, identity)
    try:
        await agent.start()
        if stopping.is_set():
            return
        agent.listener = internode_listener_context(identity)
        context = agent.listener.base
        server = _AgentServer(
            uvicorn.Config(
                build_app(agent),
                host=config.listen[0],
                port=config.listen[1],
                ssl_context_factory=lambda _config, _default: context,
                http=InternodeProtocol,
                log_level="warning",
                timeout_keep_alive=75,
                # Only the control plane calls, directly: no proxy headers to honour, and no
                # Server/Date headers it would read.
                proxy_headers=False,
                server_header=False,
                date_header=False,
            ),
            agent,
        )
        log.info("agent %s listening on %s", config.name, config.advertise_url)
        serving = asyncio.create_task(server.serve())
        signalled = asyncio.create_task(stopping.wait())
        await asyncio.wait({serving, signalled}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        signalled.cancel()
        await serving
    finally:
        await agent.stop()
        log.info("agent %s stopped", config.name)


def run_agent(config: AgentConfig) -> None:
    """Run until SIGINT/SIGTERM; then stop what the agent supervises."""
    eventloop.run(_serve(config))
