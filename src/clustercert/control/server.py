"""Wires the control plane together and serves it: store, listener, coordinator, reconciler.

Every control plane serves the API; the leader among those sharing the store (:mod:`.leader`)
also runs the reconciler and the SAN keeper. Crash recovery needs no separate step: the
leader's reconciler passes at once, takes over a cluster lock left by a dead holder (at once on
this host, else when its lease runs out), and finishes the rollout it finds in flight (see
:mod:`clustercert.control.rollout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import uvicorn

from clustercert.certfiles import CertificateFiles, GenerationPaths
from clustercert.clock import utc_now
from clustercert.control import memory
from clustercert.control.agents import AgentPool, internode_client_context
from clustercert.control.app import build_app
from clustercert.control.auth import Authenticator
from clustercert.control.carotation import CaRotation, identity_in_use, signing_ca, trusted_cas
from clustercert.control.directory import ClusterDirectory, adopt_ca, check_sans
from clustercert.control.faults import FAULT_ENV, FaultPlan
from clustercert.control.leader import LEADER_TTL, Leadership
from clustercert.control.lifecycle import Lifecycle
from clustercert.control.listener import ASGIApp, ListenerLimits, RequestLimits, api_protocol
from clustercert.control.metrics import Metrics
from clustercert.control.outage import StoreOutage
from clustercert.control.plane import ControlPlane
from clustercert.control.reconcile import WATCH_RESYNC, Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.sankeeper import SanKeeper
from clustercert.control.state import CaRecord, CertRecord, ClusterState
from clustercert.control.storetrust import StoreTrustFile
from clustercert.control.trust import TrustKeeper
from clustercert.control.webhook import WebhookNotifier
from clustercert.errors import ConfigError, StoreError
from clustercert.hosts import host_of, is_wildcard
from clustercert.internode import CONTROL_PLANE_URI
from clustercert.pki import certificates_to_pem
from clustercert.store import EtcdStore
from clustercert.tls import ReloadableServerContext
from clustercert.validation import TrustStore
from clustercert.web.app import build_console

__all__ = ["CertificateListener", "ServerSettings", "serve"]

log = logging.getLogger("clustercert.server")

# On etcd, how old the answer to a poll's change check may be (ClusterState.polled_revisions):
# the loops polling every second then make one store read a second between them, not ten.
POLL_AGE = 1.0


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9443
    store: str | None = None  # overrides the cluster directory's store URL
    agent_timeout: float = 10.0  # per agent call; bounds how long a frozen node delays a 409
    lock_wait: float = 30.0
    reconcile_interval: float = 1.0
    reconcile_max_backoff: float = 10.0  # the longest a node that comes back waits for a pass
    console: tuple[str, int] | None = ("127.0.0.1", 8443)  # the web console's HOST, PORT; None: off
    # Names or addresses clients and agents reach this control plane by (``--advertise``):
    # added to the cluster's control-plane names, which `api` and `cm` must cover.
    advertise: tuple[str, ...] = ()
    # How long a watch on a node known in sync is held before its status is read again: the
    # resync of a node that nothing else reported on (docs/decisions.md).
    watch_resync: float = WATCH_RESYNC
    # TEST-ONLY fault injection (docs/reliability.md); None: read CLUSTERCERT_FAULT once at start.
    fault: str | None = None
    lifecycle_interval: float = 5.0  # alerts and the rotation job (docs/alerts.md)
    leader_ttl: float = LEADER_TTL  # the leader key's lease: a dead leader is replaced within it
    webhook_ca_file: Path | None = None  # trusted for the alert webhook, besides the system CAs


class CertificateListener:
    """A listener's certificate files and hot-swappable context for one certificate name:
    ``api`` for the REST API, ``cm`` for the console. The files live under
    ``DIR/run/<name>-<port>/``; when the name's generation changes (a rollout through this
    process, or another control plane's seen in the store), new handshakes get the new
    certificate and open connections keep theirs."""

    def __init__(
        self,
        directory: ClusterDirectory,
        state: ClusterState,
        record: CertRecord,
        port: int,
        *,
        request_client_cert: bool = False,
        client_ca_pem: str | None = None,
    ) -> None:
        """Serve ``record`` (read with :func:`required_certificate`) on ``port``."""
        self.name = name = record.name
        self.files = CertificateFiles(directory.run_dir / f"{name}-{port}")
        self.state = state
        paths = self._write(record)
        assert paths.key is not None
        self.context = ReloadableServerContext(
            paths.cert,
            paths.key,
            request_client_cert=request_client_cert,
            client_ca_pem=client_ca_pem,
        )
        self.generation = record.generation
        self._seen = {name: record.revision}

    async def refresh(self) -> None:
        """Follow the store: another control plane may have changed what this listener serves
        (a rollout through this process calls on_committed). Runs every second: the record is
        read (and its key unsealed) only when its revision moved."""
        if await self._moved(self.name):
            record = await self.state.certificate(self.name)
            if record is not None:
                self.on_committed([record])

    async def _moved(self, name: str) -> bool:
        revision = await self.state.revision(name, recent=True)
        moved = revision != self._seen.get(name)
        self._seen[name] = revision
        return moved

    def _write(self, record: CertRecord) -> GenerationPaths:
        self.files.stage(record.name, record.generation, record.certificate, record.key)
        return self.files.activate(record.name, record.generation)

    def cert_path(self) -> Path | None:
        """The certificate file this listener serves now."""
        paths = self.files.paths(self.name, self.generation)
        return paths.cert if paths is not None else None

    def on_committed(self, records: Sequence[CertRecord]) -> None:
        for record in records:
            if record.name == self.name and record.generation != self.generation:
                paths = self._write(record)
                assert paths.key is not None
                self.context.reload(paths.cert, paths.key)
                self.generation = record.generation
                log.info("%s listener now serves generation %d", self.name, record.generation)


class ApiListener(CertificateListener):
    """The API listener (the `api` name), and the CAs it trusts for client-certificate login
    (the `mtls_trusted_ca` bundle, if set)."""

    def __init__(
        self,
        directory: ClusterDirectory,
        state: ClusterState,
        api: CertRecord,
        port: int,
        trusted_cas: CertRecord | None,
    ) -> None:
        super().__init__(
            directory,
            state,
            api,
            port,
            request_client_cert=True,
            client_ca_pem=trusted_cas.certificate if trusted_cas else None,
        )
        self._seen["mtls_trusted_ca"] = trusted_cas.revision if trusted_cas else 0

    async def refresh(self) -> None:
        """Also follow ``mtls_trusted_ca`` (a DELETE removes it without a rollout)."""
        await super().refresh()
        if await self._moved("mtls_trusted_ca"):
            self._trust(await _trusted_client_cas(self.state))

    def _trust(self, bundle: str | None) -> None:
        if bundle != self.context.client_ca_pem:
            self.context.set_client_ca(bundle)
            log.info(
                "client-certificate login %s",
                "trusts the new mtls_trusted_ca" if bundle else "is off (no mtls_trusted_ca)",
            )

    def on_committed(self, records: Sequence[CertRecord]) -> None:
        super().on_committed(records)
        for record in records:
            if record.name == "mtls_trusted_ca":
                self._trust(record.certificate)


def api_config(
    app: ASGIApp,
    context: ssl.SSLContext,
    host: str,
    port: int,
    limits: ListenerLimits | None = None,
) -> uvicorn.Config:
    """The API listener: TLS from ``context``, slow-client deadlines, bounded request heads and
    JSON, and the client certificate in the ASGI TLS extension (:mod:`.listener`)."""
    limits = limits or ListenerLimits()
    return uvicorn.Config(
        RequestLimits(app, limits),
        host=host,
        port=port,
        http=api_protocol(limits),
        ssl_context_factory=lambda _config, _default: context,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        log_level="warning",
        timeout_keep_alive=30,
    )


async def required_certificate(state: ClusterState, name: str) -> CertRecord:
    """The stored ``name`` with its key, which a listener needs to start."""
    record = await state.certificate(name)
    if record is None or record.key is None:
        raise ConfigError(f"the store holds no `{name}` certificate; was the cluster initialised?")
    return record


async def _trusted_client_cas(state: ClusterState) -> str | None:
    """The mtls_trusted_ca bundle as stored now: certificate login follows a change at once,
    on connections already open too (new handshakes follow within the refresh interval)."""
    record = await state.certificate("mtls_trusted_ca")
    return record.certificate if record else None


class _Follower(Protocol):
    """Something kept in step with the store: a listener's certificate, DIR/etcd-ca.pem."""

    name: str

    async def refresh(self) -> None: ...


async def _follow_store(
    followers: Sequence[_Follower], interval: float, outage: StoreOutage
) -> None:
    """Keep ``followers`` in step with the store (bounded by the server's lifetime); a store
    outage goes to ``outage`` (one line per change, not one per pass)."""
    while True:
        await asyncio.sleep(max(interval, 0.2))
        for follower in followers:
            try:
                await follower.refresh()
            except StoreError as exc:
                outage.failed(exc, f"following the store ({follower.name})")
            except Exception:
                log.exception("could not follow the store (%s); retrying", follower.name)


def _bind_console(host: str, port: int) -> socket.socket:
    """The console's socket, bound before anything is served: a port in use is a clear error
    at start (uvicorn would exit the process from inside its task)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the web console cannot listen on {host}:{port} ({exc.strerror}); choose another "
            "address with --console-listen HOST:PORT, or run without it: --no-console"
        ) from None
    return sock


def _committed(listeners: Sequence[CertificateListener], records: Sequence[CertRecord]) -> None:
    for listener in listeners:
        listener.on_committed(records)


class _FollowingServer(uvicorn.Server):
    """A second listener in the same process (the console): the API server owns SIGINT and
    SIGTERM (uvicorn restores and re-raises them when it stops); this one stops with it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def record_advertised(state: ClusterState, settings: ServerSettings) -> None:
    """Add ``--advertise`` to the cluster's control-plane names; refuse a wildcard listen
    address when no name says where this control plane can be reached (the api certificate
    could then name none of the addresses clients use)."""
    hosts = check_sans([host_of(a) for a in settings.advertise], "--advertise")
    added = await state.add_control_plane_names(hosts)
    if added:
        log.info("control-plane names added: %s", ", ".join(added))
    if is_wildcard(settings.host) and not await state.control_plane_names():
        raise ConfigError(
            f"--listen {settings.host or '*'}:{settings.port} accepts connections on every "
            "address, but the cluster knows no name or address this control plane is reached "
            "by, so the api certificate names none of them; pass --advertise ADDRESS_OR_NAME "
            "(repeatable), or listen on one address"
        )


def _write_ca_files(directory: ClusterDirectory, record: CaRecord) -> None:
    """The directory's copies of the store's CA: ``ca.pem`` (every CA trusted now, the signing
    one first), ``ca.key`` (the signing CA's) and the identity this control plane presents."""
    signing = signing_ca(record)
    if directory.write_ca(trusted_cas(record), signing.key_pem):
        log.info("wrote %s from the store's internal CA", directory.ca_file)
    if directory.write_identity(*identity_in_use(record)):
        log.info("wrote the control plane's internode identity from the store")


def _webhook_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system CAs, plus ``ca_file`` (a private CA that signed the webhook receiver)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--webhook-ca-file {ca_file}: {exc}") from exc
    return context


def _control_plane_name(settings: ServerSettings) -> str:
    """HOST:PORT this control plane's API is reached at: its first advertised name, else its
    listen address (how GET /v1/cluster/control_planes names it)."""
    host = host_of(settings.advertise[0]) if settings.advertise else settings.host
    return f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"


async def serve(directory: ClusterDirectory, settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM."""
    store = directory.open_store(settings.store)
    try:
        state = directory.state(store)
        if isinstance(store, EtcdStore):
            # Each read is a round trip to etcd: the loops that poll every second share one.
            state.poll_age = POLL_AGE
        await record_advertised(state, settings)
        if await asyncio.to_thread(directory.ensure_control_plane_identity, utc_now()):
            log.warning(
                "reissued the control plane's internode identity with its URI SAN %s "
                "(agents now refuse internal-CA client certificates without it)",
                CONTROL_PLANE_URI,
            )
        # The store's CA is authoritative; the directory's files are copies of it.
        ca_record = await adopt_ca(state, directory)
        await asyncio.to_thread(_write_ca_files, directory, ca_record)
        ca = signing_ca(ca_record)
        trusted = trusted_cas(ca_record)
        listener = ApiListener(
            directory,
            state,
            await required_certificate(state, "api"),
            settings.port,
            await state.certificate("mtls_trusted_ca"),
        )
        listeners: list[CertificateListener] = [listener]
        if settings.console is not None:
            console_socket = _bind_console(*settings.console)
            console_listener = CertificateListener(
                directory, state, await required_certificate(state, "cm"), settings.console[1]
            )
            listeners.append(console_listener)

        def own_files() -> dict[str, Path]:
            files = {
                "control_plane_identity": directory.identity_cert,
                "internal_ca": directory.ca_file,
            }
            for each in listeners:  # api, and cm when the console runs
                served = each.cert_path()
                if served is not None:
                    files[each.name] = served
            return files

        name = _control_plane_name(settings)
        metrics = Metrics(state, node=f"control-plane@{name}", own_files=own_files)
        outage = StoreOutage(on_change=lambda up: metrics.store_up.set(1 if up else 0))
        pool = AgentPool(
            internode_client_context(
                None,
                directory.identity_cert,
                directory.identity_key,
                certificates_to_pem(trusted),
            ),
            settings.agent_timeout,
            on_call=metrics.observe_agent_call,
        )
        fault_spec = settings.fault if settings.fault is not None else os.environ.get(FAULT_ENV)
        fault = FaultPlan.parse(fault_spec, directory.run_dir) if fault_spec else None
        if fault is not None:
            log.warning("TEST-ONLY fault injection armed: %s", fault.describe())
        trust = TrustStore.system(extra=trusted)
        # etcd over HTTPS: the control plane trusts each root pinned for the members.
        store_trust = None
        if isinstance(store, EtcdStore) and store.uses_tls:
            store_trust = StoreTrustFile(directory.etcd_ca_file, directory.ca_file, state)
        keeper = TrustKeeper(
            state,
            pool,
            trust,
            trusted,
            on_pinned=store_trust.pinned if store_trust is not None else None,
        )
        coordinator = Coordinator(
            state,
            pool,
            lock_wait=settings.lock_wait,
            on_committed=lambda records: _committed(listeners, records),
            fault=fault,
            trust=keeper,
        )
        reconciler = Reconciler(
            coordinator,
            interval=settings.reconcile_interval,
            max_backoff=settings.reconcile_max_backoff,
            resync=settings.watch_resync,
            outage=outage,
        )
        pool.on_unavailable = reconciler.suspect
        notifier = WebhookNotifier(
            _webhook_context(settings.webhook_ca_file), observe=metrics.observe_webhook
        )
        lifecycle = Lifecycle(
            state,
            coordinator,
            ca,
            metrics,
            notifier,
            interval=settings.lifecycle_interval,
            outage=outage,
        )
        sankeeper = SanKeeper(state, coordinator, ca, reconciler.health, outage=outage)
        leadership = Leadership(
            state,
            name=name,
            api_url=f"https://{name}",
            advertise=settings.advertise,
            health=reconciler.health,
            outage=outage,
            work=[reconciler.run_forever, sankeeper.run_forever],
            ttl=settings.leader_ttl,
            on_change=metrics.set_leader,
        )
        control = ControlPlane(
            state=state,
            coordinator=coordinator,
            reconciler=reconciler,
            authenticator=Authenticator(
                state.user,
                find_certificate_user=state.certificate_user,
                trusted_client_cas=lambda: _trusted_client_cas(state),
            ),
            trust=trust,
            metrics=metrics,
            lifecycle=lifecycle,
            ca=ca,
            sankeeper=sankeeper,
            ca_bundle_pem=certificates_to_pem(trusted),
            leadership=leadership,
        )

        async def use_ca(record: CaRecord) -> None:
            """Make this control plane sign, trust and present what ``record`` says."""
            await asyncio.to_thread(_write_ca_files, directory, record)
            signing, cas = signing_ca(record), trusted_cas(record)
            bundle = certificates_to_pem(cas)
            if bundle != control.ca_bundle_pem:
                anchors = TrustStore.system(extra=cas)
                control.trust = keeper.anchors = anchors
                keeper.internal_cas = cas
                control.ca_bundle_pem = bundle
                log.info("internal CA: trusting %d CA(s) now", len(cas))
            control.ca = lifecycle.ca = sankeeper.ca = signing
            pool.use_context(
                internode_client_context(None, directory.identity_cert, directory.identity_key,
                                         bundle)
            )  # fmt: skip

        control.ca_rotation = CaRotation(
            state, pool, coordinator, directory, use_ca, fault=fault, outage=outage
        )
        server = uvicorn.Server(
            api_config(build_app(control), listener.context.base, settings.host, settings.port)
        )
        # The first cycle runs before the listener starts: on a store of its own this process
        # leads at once, and the reconciler's first pass (the recovery) normally has the lock
        # before the first request; an update that gets it first finishes the leftover itself.
        leading = asyncio.create_task(leadership.run_forever())
        following = asyncio.create_task(
            _follow_store(
                [*listeners, *([store_trust] if store_trust is not None else [])],
                settings.reconcile_interval,
                outage,
            )
        )
        watching = asyncio.create_task(lifecycle.run_forever(lambda: leadership.leading))
        notifying = asyncio.create_task(notifier.run())
        rotating = asyncio.create_task(control.ca_rotation.run_forever(lambda: leadership.leading))
        memory.tune_allocator()
        trimmer = memory.Trimmer()
        control.after_rollout = trimmer.soon
        trimming = asyncio.create_task(trimmer.run_forever())
        tasks = [leading, following, watching, notifying, rotating, trimming]
        if settings.console is not None:
            host, port = settings.console
            console = _FollowingServer(
                api_config(build_console(control), console_listener.context.base, host, port)
            )
            tasks.append(asyncio.create_task(console.serve(sockets=[console_socket])))
            log.info("web console listening on https://%s:%d", host, port)
        log.info("control plane listening on https://%s:%d", settings.host, settings.port)
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pool.aclose()
    finally:
        store.close()
