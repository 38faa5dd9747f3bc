"""The agent's own HTTPS listener: Prometheus metrics of the node, served with the
``metrics_exporter`` certificate (DESIGN §3) and swapped in place when it is replaced.

Scrapers authenticate with a client certificate from the cluster's internal CA (mutual TLS,
like every internode call). A new certificate applies to new handshakes; open connections keep
the one they were made with (:class:`clustercert.tls.ReloadableServerContext`).

``node_cert_expiration_seconds{cluster,logical_name,node,path}`` (:mod:`clustercert.expiry`)
covers every certificate name the node holds and the node's own internode identity and
trusted internal CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clustercert.agent.config import ServiceConfig
from clustercert.agent.services import ReloadFailed, Service
from clustercert.certfiles import CertificateFiles, GenerationPaths
from clustercert.clock import utc_now
from clustercert.expiry import expiration_family
from clustercert.tls import ReloadableServerContext

__all__ = ["MetricsListener", "NodeLabels"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class NodeLabels:
    """Who this node is, as the expiry series label it (Redis Enterprise's labels)."""

    cluster: str  # the cluster's name (FQDN), from the join answer
    node: str  # the node's id in the cluster
    identity: Mapping[str, Path]  # logical name -> file of the node's own internal certificates


class _FilesCollector(Collector):
    """What the node holds, read from its files at scrape time."""

    def __init__(
        self, files: CertificateFiles, labels: NodeLabels, clock: Callable[[], dt.datetime]
    ) -> None:
        self.files = files
        self.labels = labels
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        generation = GaugeMetricFamily(
            "clustercert_node_certificate_generation",
            "The generation of each certificate the node's services use.",
            labels=["name"],
        )
        not_after = GaugeMetricFamily(
            "clustercert_node_certificate_not_after_timestamp_seconds",
            "When the certificate the node uses expires (Unix time).",
            labels=["name"],
        )
        served = dict(self.labels.identity)
        for name in self.files.names():
            current = self.files.current(name)
            paths = self.files.paths(name, current) if current is not None else None
            if current is None or paths is None:
                continue
            leaf = x509.load_pem_x509_certificates(paths.cert.read_bytes())[0]
            generation.add_metric([name], float(current))
            not_after.add_metric([name], leaf.not_valid_after_utc.timestamp())
            served[name] = paths.cert
        expiration = expiration_family(self.labels.cluster, self.labels.node, served, self.clock())
        yield from (generation, not_after, expiration)


async def _serve_without_exiting(server: uvicorn.Server) -> None:
    """``server.serve()``, except that a listener that cannot start (uvicorn calls
    ``sys.exit(3)`` when its port is taken) fails this task instead of ending the agent: the
    commit that started it then fails with the reason, and the agent goes on serving."""
    try:
        await server.serve()
    except SystemExit as exc:
        raise OSError(f"uvicorn could not start it (exit {exc.code}; is the port taken?)") from None


class MetricsListener(Service):
    """Starts on the first ``metrics_exporter`` it gets; later ones swap the SSL context."""

    def __init__(
        self,
        config: ServiceConfig,
        probe_timeout: float,
        files: CertificateFiles,
        ca_file: Path,
        labels: NodeLabels,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        super().__init__(config, probe_timeout)
        self.ca_file = ca_file
        self.registry = CollectorRegistry()
        self.registry.register(_FilesCollector(files, labels, clock))
        self.context: ReloadableServerContext | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _app(self) -> Starlette:
        async def metrics(request: Request) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)

        return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])

    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        if paths.key is None:
            raise ReloadFailed("the metrics listener needs a key")
        try:
            if self.context is not None:
                self.context.reload(paths.cert, paths.key)
                return
            self.context = ReloadableServerContext(
                paths.cert, paths.key, client_ca=self.ca_file, require_client=True
            )
        except (ssl.SSLError, OSError) as exc:
            raise ReloadFailed(f"the new pair does not load into a TLS context: {exc}") from exc
        await self._serve(self.context)

    async def _serve(self, context: ReloadableServerContext) -> None:
        assert self.config.address is not None
        host, port = self.config.address
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app(),
                host=host,
                port=port,
                ssl_context_factory=lambda _config, _default: context.base,
                log_level="warning",
                lifespan="off",
            )
        )
        # uvicorn chains signal handlers: on SIGTERM this server stops, restores the agent's
        # handler and re-raises the signal, so the agent stops too.
        self._task = asyncio.create_task(_serve_without_exiting(self._server))
        for _ in range(200):
            if self._server.started:
                return
            if self._task.done():
                break
            await asyncio.sleep(0.025)
        self.context = None
        why = ""
        if self._task.done() and (failure := self._task.exception()) is not None:
            why = f": {failure}"
        raise ReloadFailed(f"the metrics listener did not start on {host}:{port}{why}")

    async def start(self, current: dict[str, GenerationPaths]) -> None:
        paths = current.get(self.config.certificate)
        if paths is not None:
            await self.reload(self.config.certificate, paths)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self._server = self._task = None
        self.context = None
