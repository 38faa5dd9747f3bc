"""The TLS services of a node, reloaded in place and verified by handshake (DESIGN §7).

- ``redis``: ``CONFIG SET tls-cert-file X tls-key-file Y`` in one command over the local unix
  socket (the outgoing client certificate likewise with ``tls-client-cert-file``/``-key-file``).
  With ``supervise``, the agent also starts ``redis-server`` itself (TLS port only).
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

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from clustercert.agent.config import ServiceConfig
from clustercert.agent.probe import probe, served_fingerprint
from clustercert.certfiles import GenerationPaths
from clustercert.internode import ServiceProof

__all__ = ["CommandService", "RedisService", "ReloadFailed", "Service"]


class Service(ABC):
    """A service that uses one or more certificate names of the node."""

    def __init__(self, config: ServiceConfig, probe_timeout: float) -> None:
        self.config = config
        self.probe_timeout = probe_timeout

    @property
    def name(self) -> str:
        return self.config.name

    def certificates(self) -> frozenset[str]:
        names = {self.config.certificate}
        if self.config.client_certificate:
            names.add(self.config.client_certificate)
        return frozenset(names)

    @abstractmethod
    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        """Point the service at ``paths``; raise ``ReloadFailed`` with a reason on failure."""

    async def verify(self, certificate: str, expected: str) -> ServiceProof:
        """Prove by handshake (with and without SNI) that the service serves ``expected``."""
        if self.config.address is None:
            return ServiceProof(self.name, certificate, True, None, None)
        host, port = self.config.address
        result = await probe(host, port, expected, self.config.sni, self.probe_timeout)
        return ServiceProof(self.name, certificate, result.ok, result.served, result.error)

    async def apply(self, certificate: str, paths: GenerationPaths, expected: str) -> ServiceProof:
        try:
            await self.reload(certificate, paths)
        except ReloadFailed as exc:
            served = await self.served(certificate)
            return ServiceProof(self.name, certificate, False, served, str(exc))
        return await self.verify(certificate, expected)

    async def served(self, certificate: str) -> str | None:
        """What the service serves now for ``certificate``, by handshake; None if unknown."""
        if self.config.address is None or certificate != self.config.certificate:
            return None
        host, port = self.config.address
        try:
            return await served_fingerprint(host, port, None, self.probe_timeout)
        except (OSError, ssl.SSLError, TimeoutError):
            return None

    async def start(self, current: dict[str, GenerationPaths]) -> None:  # noqa: B027
        """Start what the agent supervises, with the current files. Default: nothing."""

    async def stop(self) -> None:  # noqa: B027
        """Stop what the agent supervises. Default: nothing."""


class ReloadFailed(Exception):
    """A service refused or failed the reload; the message says why."""


class RedisService(Service):
    def __init__(self, config: ServiceConfig, probe_timeout: float, ca_file: Path, data_dir: Path):
        super().__init__(config, probe_timeout)
        assert config.socket is not None
        self.socket = config.socket
        self.ca_file = ca_file
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._redis: aioredis.Redis | None = None

    def _client(self) -> aioredis.Redis:
        # One client, one pooled connection, kept: a new client per call costs a connect, two
        # CLIENT SETINFO round trips and an importlib.metadata lookup of redis-py's version.
        if self._redis is None:
            self._redis = aioredis.Redis(
                unix_socket_path=str(self.socket), socket_timeout=self.probe_timeout
            )
        return self._redis

    async def _config_set(self, *pairs: str) -> None:
        client = self._client()
        try:
            await client.execute_command("CONFIG", "SET", *pairs)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise ReloadFailed(f"redis at {self.socket} refused CONFIG SET: {exc}") from exc

    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        if paths.key is None:
            raise ReloadFailed(f"{certificate} has no key; redis needs one")
        if certificate == self.config.certificate:
            # CONFIG SET first, without a PING before it: one round trip less on every commit.
            # Only when it fails is it worth asking whether redis answers at all.
            answering = self.socket.exists()
            if answering:
                try:
                    await self._config_set(
                        "tls-cert-file", str(paths.cert), "tls-key-file", str(paths.key)
                    )
                except ReloadFailed:
                    if await self._answers():
                        raise  # redis runs and refuses these files
                    answering = False
            if not answering:
                if not self.config.supervise:
                    raise ReloadFailed(f"redis does not answer on {self.socket}")
                await self._spawn(paths)
                return
        if certificate == self.config.client_certificate:
            await self._config_set(
                "tls-client-cert-file", str(paths.cert), "tls-client-key-file", str(paths.key)
            )

    async def verify(self, certificate: str, expected: str) -> ServiceProof:
        if certificate == self.config.certificate:
            return await super().verify(certificate, expected)
        # An outgoing client certificate cannot be proven by a handshake *to* redis; prove
        # instead that redis now points at the new files.
        client = self._client()
        try:
            reply = await client.config_get("tls-client-cert-file")
        except (RedisError, OSError) as exc:
            return ServiceProof(self.name, certificate, False, None, f"CONFIG GET failed: {exc}")
        return ServiceProof(self.name, certificate, bool(reply), None, None)

    async def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = self._client()
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False

    async def start(self, current: dict[str, GenerationPaths]) -> None:
        paths = current.get(self.config.certificate)
        if self.config.supervise and paths is not None and not await self._answers():
            await self._spawn(paths)
        client_paths = current.get(self.config.client_certificate or "")
        if client_paths is not None and await self._answers():
            with contextlib.suppress(ReloadFailed):
                await self.reload(self.config.client_certificate or "", client_paths)

    async def _spawn(self, paths: GenerationPaths) -> None:
        assert self.config.address is not None and paths.key is not None
        host, port = self.config.address
        args = [
            self.config.server_binary,
            "--port", "0",
            "--bind", host,
            "--tls-port", str(port),
            "--tls-cert-file", str(paths.cert),
            "--tls-key-file", str(paths.key),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "optional",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
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
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
            self._redis = None
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


class CommandService(Service):
    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        argv = [
            a.replace("{cert}", str(paths.cert)).replace("{key}", str(paths.key or ""))
            for a in self.config.command
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        except TimeoutError:
            proc.kill()
            raise ReloadFailed(f"{argv[0]} did not finish within 30 s") from None
        if proc.returncode != 0:
            tail = output.decode(errors="replace").strip()[-300:]
            raise ReloadFailed(f"{argv[0]} exited with {proc.returncode}: {tail}")
