"""The TLS services of a node, reloaded in place and verified by handshake (DESIGN §7).

- ``redis``: ``CONFIG SET tls-cert-file X tls-key-file Y`` in one command over the local unix
  socket (the outgoing client certificate likewise with ``tls-client-cert-file``/``-key-file``),
  ``tls-ca-cert-file`` for its trust bundle (agent/trust.py). With ``supervise``, the agent also
  starts ``redis-server`` itself (TLS port only, ``tls-auth-clients yes``, TLS replication from
  ``replicaof`` when set). Replication links are proven after a commit (:class:`LinkProof`).
- ``command``: run a command (e.g. ``systemctl reload nginx``), then verify by handshake.

A reload that "succeeds" while the service still serves the old certificate is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from cryptography import x509
from redis.exceptions import RedisError

from clustercert.agent.config import ServiceConfig
from clustercert.agent.probe import probe, served_fingerprint
from clustercert.agent.trust import TrustBundles, fingerprint
from clustercert.certfiles import GenerationPaths
from clustercert.internode import LinkProof, ServiceProof

__all__ = ["CommandService", "RedisService", "ReloadFailed", "Service", "run_command"]


class Service(ABC):
    """A service that uses one or more certificate names of the node."""

    def __init__(self, config: ServiceConfig, probe_timeout: float) -> None:
        self.config = config
        self.probe_timeout = probe_timeout

    @property
    def name(self) -> str:
        return self.config.name

    # Whether the server may choose its certificate by the client's SNI, so that the proof
    # needs a handshake without SNI besides the one with it. Unknown servers: assume it may.
    selects_by_sni = True

    def certificates(self) -> frozenset[str]:
        names = {self.config.certificate}
        if self.config.client_certificate:
            names.add(self.config.client_certificate)
        return frozenset(names)

    @abstractmethod
    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        """Point the service at ``paths``; raise ``ReloadFailed`` with a reason on failure."""

    async def verify(
        self, certificate: str, expected: str, anchors_pem: str | None = None
    ) -> ServiceProof:
        """Prove by handshake (with and without SNI) that the service serves ``expected``; with
        ``anchors_pem``, that a client trusting those roots accepts it (a verifying handshake)."""
        if self.config.address is None:
            return ServiceProof(self.name, certificate, True, None, None)
        host, port = self.config.address
        result = await probe(
            host, port, expected, self.config.sni, self.probe_timeout, anchors_pem,
            without_sni=self.selects_by_sni,
        )  # fmt: skip
        return ServiceProof(
            self.name, certificate, result.ok, result.served, result.error, result.verified
        )

    async def apply(
        self,
        certificate: str,
        paths: GenerationPaths,
        expected: str,
        anchors_pem: str | None = None,
    ) -> ServiceProof:
        try:
            await self.reload(certificate, paths)
        except ReloadFailed as exc:
            served = await self.served(certificate)
            return ServiceProof(self.name, certificate, False, served, str(exc))
        return await self.verify(certificate, expected, anchors_pem)

    async def served(self, certificate: str) -> str | None:
        """What the service serves now for ``certificate``, by handshake; None if unknown."""
        if self.config.address is None or certificate != self.config.certificate:
            return None
        host, port = self.config.address
        try:
            return await served_fingerprint(host, port, None, self.probe_timeout)
        except (OSError, ssl.SSLError, TimeoutError):
            return None

    async def prove_links(self, certificate: str) -> list[LinkProof]:
        """After ``certificate`` was applied: re-establish the links that use it and prove they
        come back. Default: the service has no links."""
        return []

    def trust_names(self) -> frozenset[str]:
        """The names whose roots this service must trust (what its peers present)."""
        return frozenset()

    async def trust(
        self, roots: list[x509.Certificate], drop_now: bool = False
    ) -> tuple[str, ...] | None:
        """Make the service trust ``roots`` (plus its fixed CAs); raise ``ReloadFailed``.
        ``drop_now``: a root that left the bundle must stop being trusted before this returns
        (the internal CA rotation retires a CA), even where that costs a restart. Returns the
        fingerprints of every CA it now trusts, or None when it has no trust bundle. Default:
        none."""
        return None

    async def start(self, current: dict[str, GenerationPaths]) -> None:  # noqa: B027
        """Start what the agent supervises, with the current files. Default: nothing."""

    async def stop(self) -> None:  # noqa: B027
        """Stop what the agent supervises. Default: nothing."""


class ReloadFailed(Exception):
    """A service refused or failed the reload; the message says why."""


class RedisService(Service):
    """A redis-server: ``certificate`` is its server certificate (clients and incoming
    replication), ``client_certificate`` the one it presents on its own replication link."""

    PROOF_KEY = "clustercert:link-proof"  # written on a primary to prove its replicas get writes
    # redis-server has one tls-cert-file and no SNI callback: it serves the same certificate
    # with or without SNI, so one (verifying) handshake is the whole proof.
    selects_by_sni = False

    def __init__(self, config: ServiceConfig, probe_timeout: float, ca_file: Path, data_dir: Path):
        super().__init__(config, probe_timeout)
        assert config.socket is not None
        self.socket = config.socket
        self.ca_file = ca_file  # the internal CA: always in the trust bundle
        self.data_dir = data_dir
        self.bundles = TrustBundles(data_dir / "trust" / config.name)
        self.bundle: Path | None = None  # the trust bundle redis was last pointed at
        self.paths: dict[str, GenerationPaths] = {}  # the files each name last applied
        self.process: subprocess.Popen[bytes] | None = None
        self._redis: aioredis.Redis | None = None
        self._waiting: aioredis.Redis | None = None
        self._fixed: tuple[tuple[bytes, ...], list[x509.Certificate]] = ((), [])
        self._held: tuple[str, ...] = ()  # the fingerprints of self.bundle

    def _client(self) -> aioredis.Redis:
        # One client, one pooled connection, kept: a new client per call costs a connect, two
        # CLIENT SETINFO round trips and an importlib.metadata lookup of redis-py's version.
        if self._redis is None:
            self._redis = aioredis.Redis(
                unix_socket_path=str(self.socket), socket_timeout=self.probe_timeout
            )
        return self._redis

    def _blocking_client(self) -> aioredis.Redis:
        # For WAIT, which may block for link_timeout: a socket timeout that outlasts it.
        if self._waiting is None:
            self._waiting = aioredis.Redis(
                unix_socket_path=str(self.socket),
                socket_timeout=self.probe_timeout + self.config.link_timeout,
            )
        return self._waiting

    async def _command(self, *args: str, blocking: bool = False) -> Any:
        """One command; ``blocking`` for one that may block up to ``link_timeout`` (WAIT)."""
        try:
            client = self._blocking_client() if blocking else self._client()
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            what = " ".join(args[:2])
            raise ReloadFailed(f"redis at {self.socket} refused {what}: {exc}") from exc

    async def _config_set(self, *pairs: str) -> None:
        await self._command("CONFIG", "SET", *pairs)

    def trust_names(self) -> frozenset[str]:
        # A replica checks the primary's server certificate; a primary checks its replicas'
        # client certificates. Every node runs both names, so trusting the roots of both
        # covers every peer, whichever role each has.
        return self.certificates()

    def _fixed_cas(self) -> list[x509.Certificate]:
        """The internal CA and ``extra_ca_file``, read on every call (an operator may edit the
        extra file) but parsed only when their bytes change."""
        files = [self.ca_file, *([self.config.extra_ca_file] if self.config.extra_ca_file else [])]
        data = tuple(f.read_bytes() for f in files)
        if data != self._fixed[0]:
            self._fixed = (data, [c for d in data for c in x509.load_pem_x509_certificates(d)])
        return list(self._fixed[1])

    async def trust(self, roots: list[x509.Certificate], drop_now: bool = False) -> tuple[str, ...]:
        certificates = [*self._fixed_cas(), *roots]
        held = tuple(sorted({fingerprint(c) for c in certificates}))
        if held == self._held and self.bundle is not None:
            return held  # the bundle redis was pointed at holds exactly these: nothing to do
        path, fingerprints = self.bundles.write(certificates)
        if path != self.bundle and await self._answers():
            await self._config_set("tls-ca-cert-file", str(path))
        self.bundle = path
        self._held = tuple(fingerprints)
        return self._held

    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        if paths.key is None:
            raise ReloadFailed(f"{certificate} has no key; redis needs one")
        self.paths[certificate] = paths
        if certificate == self.config.certificate:
            await self._set_or_spawn(
                "tls-cert-file", str(paths.cert), "tls-key-file", str(paths.key)
            )
        if certificate == self.config.client_certificate:
            await self._set_or_spawn(
                "tls-client-cert-file", str(paths.cert), "tls-client-key-file", str(paths.key)
            )

    async def _set_or_spawn(self, *pairs: str) -> None:
        """CONFIG SET ``pairs`` without a PING first (one round trip less on every commit); only
        when that fails is it worth asking whether redis answers at all. A supervised redis
        that does not answer is started with every file it should use."""
        if self.socket.exists():
            try:
                await self._config_set(*pairs)
                return
            except ReloadFailed:
                if await self._answers():
                    raise  # redis runs and refuses these files
        if not (self.config.supervise and self.config.certificate in self.paths):
            raise ReloadFailed(f"redis does not answer on {self.socket}")
        await self._spawn()

    async def verify(
        self, certificate: str, expected: str, anchors_pem: str | None = None
    ) -> ServiceProof:
        if certificate == self.config.certificate:
            return await super().verify(certificate, expected, anchors_pem)
        # An outgoing client certificate cannot be proven by a handshake *to* redis; prove
        # here that redis points at the new files, and by the link (prove_links) that a peer
        # accepts them.
        try:
            reply = await self._command("CONFIG", "GET", "tls-client-cert-file")
        except ReloadFailed as exc:
            return ServiceProof(self.name, certificate, False, None, str(exc))
        wanted = str(self.paths[certificate].cert)
        configured = reply.get(b"tls-client-cert-file", b"").decode()  # redis-py makes a dict
        if configured != wanted:
            error = f"redis presents {configured or 'no file'} on its links, expected {wanted}"
            return ServiceProof(self.name, certificate, False, None, error)
        return ServiceProof(self.name, certificate, True, None, None)

    async def prove_links(self, certificate: str) -> list[LinkProof]:
        """A replica proves its own link (its client certificate): drop the connection to the
        primary, wait until ``master_link_status:up``. A primary proves its server certificate
        to its replicas: drop every replica connection, wait until as many replicas are online
        again, then a fresh write acknowledged by each of them (``WAIT``)."""
        if self.config.cluster_port is not None:
            return await self._relink_cluster_bus(certificate)
        if self.config.replicaof is not None and certificate == self.config.client_certificate:
            return [await self._relink_to_primary(certificate)]
        if self.config.replicaof is None and certificate == self.config.certificate:
            return await self._relink_replicas(certificate)
        return []

    async def _replication(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._client().info("replication")
        return info

    async def _until(self, done: Any, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(RedisError, OSError):
                if await done():
                    return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)

    async def _relink_to_primary(self, certificate: str) -> LinkProof:
        assert self.config.replicaof is not None
        host, port = self.config.replicaof
        link = f"replication from {host}:{port}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._command("CLIENT", "KILL", "TYPE", "master")
        except ReloadFailed as exc:
            return LinkProof(self.name, certificate, link, False, 0.0, str(exc))

        async def up() -> bool:
            return (await self._replication()).get("master_link_status") == "up"

        ok = await self._until(up, started + self.config.link_timeout)
        error = None
        if not ok:
            error = (
                f"the replication link from {host}:{port} did not come back within "
                f"{self.config.link_timeout:g} s after a forced reconnect"
                f"{await self._link_state(host, port)}; does the primary trust this node's "
                f"{certificate} certificate, and this node the primary's? "
                f"See {self.data_dir / 'redis.log'}"
            )
        return LinkProof(self.name, certificate, link, ok, loop.time() - started, error)

    async def _link_state(self, host: str, port: int) -> str:
        """What redis says of its link, for an error message."""
        try:
            info = await self._replication()
        except (RedisError, OSError) as exc:
            return f" (INFO replication failed: {exc})"
        source = f"{info.get('master_host')}:{info.get('master_port')}"
        if source != f"{host}:{port}":
            return f" (redis replicates from {source}, not from the configured {host}:{port})"
        return f" (master_link_status:{info.get('master_link_status')})"

    async def _online_replicas(self) -> int:
        info = await self._replication()
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return sum(1 for replica in replicas if replica.get("state") == "online")

    async def _relink_replicas(self, certificate: str) -> list[LinkProof]:
        """Drop every replica connection, then one fresh write that each of them must
        acknowledge (``WAIT``). Only a replica that came back acknowledges it: the old
        connections are gone once ``CLIENT KILL`` answers, and a returning replica reads the
        write (and the ack request ``WAIT`` sends) from the backlog after its handshake with the
        new certificate. One blocking round trip instead of polling ``INFO replication``, which
        cost the primary's agent and its redis CPU for every replica on every poll."""
        try:
            before = await self._online_replicas()
        except (RedisError, OSError) as exc:
            return [LinkProof(self.name, certificate, "replicas", False, 0.0, str(exc))]
        if before == 0:
            return []
        link = f"{before} replica(s) of this primary"
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait_ms = str(max(1, int(self.config.link_timeout * 1000)))
        error = None
        try:
            await self._command("CLIENT", "KILL", "TYPE", "replica")
            await self._command("SET", self.PROOF_KEY, certificate, "PX", "60000")
            acks = int(await self._command("WAIT", str(before), wait_ms, blocking=True))
        except ReloadFailed as exc:
            return [LinkProof(self.name, certificate, link, False, 0.0, str(exc))]
        if acks < before:
            try:
                online = await self._online_replicas()
            except (RedisError, OSError):
                online = 0
            error = (
                f"only {acks} of {before} replicas acknowledged a write within "
                f"{self.config.link_timeout:g} s after this primary switched {certificate} "
                f"({online} reconnected; do they trust its root?)"
            )
        seconds = loop.time() - started
        return [LinkProof(self.name, certificate, link, error is None, seconds, error)]

    async def _cluster_peers(self) -> list[str]:
        """The ids of the other nodes this Redis Cluster node knows and talks to."""
        text = (await self._command("CLUSTER", "NODES")).decode()
        peers = []
        for line in text.splitlines():
            node_id, _address, flags, *_ = line.split()
            if not {"myself", "noaddr", "handshake"} & set(flags.split(",")):
                peers.append(node_id)
        return peers

    async def _bus_links(self) -> set[tuple[str, str]]:
        """(direction, node id) of every cluster bus link up now (CLUSTER LINKS, redis 7)."""
        links = await self._client().execute_command("CLUSTER", "LINKS")  # type: ignore[no-untyped-call]
        return {(k[b"direction"].decode(), k[b"node"].decode()) for k in links}

    async def _relink_cluster_bus(self, certificate: str) -> list[LinkProof]:
        """Drop the cluster bus links this node opened (``DEBUG CLUSTERLINK KILL to``, which
        needs ``enable-debug-command local``) and wait until one is back to every peer: each
        peer accepted this node's client certificate and this node trusted each peer's server
        certificate. Only the links this node opened: killing a link a peer opened races with
        that peer closing it, which crashes redis 7.0 (a NULL link), and only this node closes
        its own. A peer proves this node's server certificate when it relinks in turn."""
        try:
            peers = await self._cluster_peers()
            opened = {node for direction, node in await self._bus_links() if direction == "to"}
        except (ReloadFailed, RedisError, OSError) as exc:
            return [LinkProof(self.name, certificate, "cluster bus", False, 0.0, str(exc))]
        if not peers:
            return []
        link = f"cluster bus to {len(peers)} node(s)"
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for peer in sorted(opened & set(peers)):
                await self._command("DEBUG", "CLUSTERLINK", "KILL", "to", peer)
        except ReloadFailed as exc:
            return [LinkProof(self.name, certificate, link, False, 0.0, str(exc))]
        wanted = {("to", peer) for peer in peers}

        async def back() -> bool:
            return wanted <= await self._bus_links()

        error = None
        if not await self._until(back, started + self.config.link_timeout):
            down = sorted({peer[:8] for _, peer in wanted - await self._bus_links()})
            error = (
                f"the cluster bus links to {', '.join(down)} did not come back within "
                f"{self.config.link_timeout:g} s after a forced reconnect; do those nodes trust "
                f"this node's {certificate} certificate, and this node theirs? See "
                f"{self.data_dir / 'redis.log'}"
            )
        seconds = loop.time() - started
        return [LinkProof(self.name, certificate, link, error is None, seconds, error)]

    async def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = self._client()
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False

    async def start(self, current: dict[str, GenerationPaths]) -> None:
        """Adopt a running redis-server (the agent has pointed it at its bundle already, see
        Agent.start) or start one with the current files."""
        self.paths.update({n: p for n, p in current.items() if n in self.certificates()})
        if await self._answers():
            client_paths = self.paths.get(self.config.client_certificate or "")
            if client_paths is not None:
                with contextlib.suppress(ReloadFailed):
                    await self.reload(self.config.client_certificate or "", client_paths)
        elif self.config.supervise and self.config.certificate in self.paths:
            await self._spawn()

    async def _spawn(self) -> None:
        paths = self.paths[self.config.certificate]
        assert self.config.address is not None and paths.key is not None
        host, port = self.config.address
        args = [
            self.config.server_binary,
            "--port", "0",
            "--bind", host,
            "--tls-port", str(port),
            "--tls-cert-file", str(paths.cert),
            "--tls-key-file", str(paths.key),
            "--tls-ca-cert-file", str(self.bundle or self.ca_file),
            "--tls-auth-clients", "yes",
            "--tls-replication", "yes",
            # A replica that (re)starts needs a full sync: start it at once, not after 5 s.
            "--repl-diskless-sync-delay", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        client = self.paths.get(self.config.client_certificate or "")
        if client is not None and client.key is not None:
            args += ["--tls-client-cert-file", str(client.cert)]
            args += ["--tls-client-key-file", str(client.key)]
        if self.config.replicaof is not None:
            args += ["--replicaof", self.config.replicaof[0], str(self.config.replicaof[1])]
        if self.config.cluster_port is not None:
            args += [
                "--cluster-enabled", "yes",
                "--tls-cluster", "yes",
                "--cluster-port", str(self.config.cluster_port),
                "--cluster-config-file", str(self.data_dir / "nodes.conf"),
                # DEBUG CLUSTERLINK KILL proves the bus links (local connections only).
                "--enable-debug-command", "local",
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        for _ in range(200):
            if await self._answers():
                return
            if self.process.poll() is not None:
                raise ReloadFailed(
                    f"redis-server exited with {self.process.returncode}; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            await asyncio.sleep(0.025)
        raise ReloadFailed(f"redis-server did not answer on {self.socket} within 5 s")

    async def stop(self) -> None:
        for client in (self._redis, self._waiting):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._redis = self._waiting = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            for _ in range(200):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.025)
            else:
                self.process.kill()
        self.process = None

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "redis.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None


COMMAND_TIMEOUT = 30.0  # seconds an operator's reload or restart command may take


class CommandService(Service):
    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        argv = [
            a.replace("{cert}", str(paths.cert)).replace("{key}", str(paths.key or ""))
            for a in self.config.command
        ]
        await run_command(argv, COMMAND_TIMEOUT)


async def run_command(argv: list[str], timeout: float, doing: str = "") -> None:
    """Run ``argv`` (no shell, no input), bounded by ``timeout``; ReloadFailed with the tail of
    its output when it fails. ``doing``: what the message starts with, e.g. "restarting etcd"."""
    prefix = f"{doing}: " if doing else ""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        raise ReloadFailed(f"{prefix}{argv[0]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip()[-300:]
        raise ReloadFailed(f"{prefix}{argv[0]} exited with {proc.returncode}: {tail}")
