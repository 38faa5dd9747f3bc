"""Client load during rotations: a bounded pool of threads, in its own process, each opening a
new verified TLS connection to a redis node, sending PING, reading PONG and closing, round-robin
over every node, until told to stop or a count or time bound is reached.

It runs in a separate process so that its threads do not share a GIL with the process timing
the rotations. A failed connection (TCP connect, TLS handshake or certificate verification) and a
failed command (no ``+PONG``) are counted separately; the first few errors are kept verbatim.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoadConfig", "LoadPool", "LoadResult"]

_PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass(frozen=True)
class LoadConfig:
    ports: tuple[int, ...]
    cafiles: tuple[str, ...]  # every CA whose certificates redis may serve
    server_name: str
    # The client certificate and key every connection presents: redis requires one
    # (tls-auth-clients yes; the demo's operator certificate, cluster.json's redis_client).
    client_cert: tuple[str, str] | None = None
    workers: int = 8
    max_connections: int = 200_000
    max_seconds: float = 600.0
    timeout: float = 5.0


@dataclass
class LoadResult:
    connections: int = 0  # attempted
    failed_connections: int = 0
    commands: int = 0  # attempted
    failed_commands: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.failed_connections + self.failed_commands


def _context(config: LoadConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cafile in config.cafiles:
        ctx.load_verify_locations(cafile=cafile)
    if config.client_cert is not None:
        ctx.load_cert_chain(*config.client_cert)
    return ctx


class _Counters:
    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.result = LoadResult()

    def take(self) -> bool:
        """Reserve one connection; False when the count bound is reached."""
        with self.lock:
            if self.result.connections >= self.limit:
                return False
            self.result.connections += 1
            return True

    def fail(self, kind: str, error: str) -> None:
        with self.lock:
            if kind == "connection":
                self.result.failed_connections += 1
            else:
                self.result.failed_commands += 1
            if len(self.result.errors) < 10:
                self.result.errors.append(f"{kind}: {error}")

    def command(self) -> None:
        with self.lock:
            self.result.commands += 1


def _one(ctx: ssl.SSLContext, config: LoadConfig, port: int, counters: _Counters) -> None:
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=config.timeout)
    except OSError as exc:
        counters.fail("connection", f"127.0.0.1:{port} connect: {exc!r}")
        return
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=config.server_name)
        except (OSError, ssl.SSLError) as exc:
            counters.fail("connection", f"127.0.0.1:{port} handshake: {exc!r}")
            return
        with tls:
            counters.command()
            try:
                tls.sendall(_PING)
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = tls.recv(64)
                    if not chunk:
                        break
                    reply += chunk
            except (OSError, ssl.SSLError) as exc:
                counters.fail("command", f"127.0.0.1:{port} PING: {exc!r}")
                return
            if reply != b"+PONG\r\n":
                counters.fail("command", f"127.0.0.1:{port} PING answered {reply[:100]!r}")
    finally:
        raw.close()


def _worker(
    index: int,
    ctx: ssl.SSLContext,
    config: LoadConfig,
    counters: _Counters,
    stop: multiprocessing.synchronize.Event,
    deadline: float,
) -> None:
    ports = config.ports
    turn = index
    while not stop.is_set() and time.monotonic() < deadline and counters.take():
        _one(ctx, config, ports[turn % len(ports)], counters)
        turn += config.workers


def _run(
    config: LoadConfig, stop: multiprocessing.synchronize.Event, results: multiprocessing.Queue[Any]
) -> None:
    ctx = _context(config)
    counters = _Counters(config.max_connections)
    start = time.monotonic()
    deadline = start + config.max_seconds
    threads = [
        threading.Thread(target=_worker, args=(i, ctx, config, counters, stop, deadline))
        for i in range(config.workers)
    ]
    for thread in threads:
        thread.start()
    results.put(("ready", None))
    for thread in threads:
        thread.join()
    counters.result.seconds = time.monotonic() - start
    results.put(("result", counters.result))


class LoadPool:
    """Start with :meth:`start`, end with :meth:`stop` (which returns the counts)."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results: multiprocessing.Queue[Any] = context.Queue()
        self._process = context.Process(
            target=_run, args=(config, self._stop, self._results), daemon=True
        )

    def start(self, timeout: float = 30.0) -> None:
        self._process.start()
        kind, _ = self._results.get(timeout=timeout)
        assert kind == "ready"

    def stop(self, timeout: float = 30.0) -> LoadResult:
        self._stop.set()
        try:
            kind, result = self._results.get(timeout=timeout + self.config.timeout)
        except queue.Empty:
            self._process.kill()
            raise RuntimeError("the load process did not report within the time bound") from None
        finally:
            self._process.join(timeout=timeout)
            if self._process.is_alive():
                self._process.kill()
        assert kind == "result" and isinstance(result, LoadResult)
        return result
