"""Helpers for the store contract suite: a real etcd process, a fake clock, a not-etcd server.

The pytest fixtures built from these live in ``tests/store/test_contract.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import httpx

ETCD_BINARY = "/usr/bin/etcd"
ETCD_START_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def etcd_binary() -> str:
    """The etcd server binary, or a failure message telling how to install it."""
    found = shutil.which("etcd") or (ETCD_BINARY if Path(ETCD_BINARY).exists() else None)
    if found is None:
        raise RuntimeError(
            "the etcd half of the store contract suite needs an etcd server binary; install "
            "Debian's etcd-server (`make install` does: apt-get install etcd-server)"
        )
    return found


class EtcdProcess:
    """One single-member etcd on free loopback ports, with its data in ``data_dir``.

    Short heartbeat and election timeouts make it elect itself at once and lower etcd's minimum
    lease TTL (1.5 x election timeout) below one second, so a 1 s lock lease is honoured.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        binary = etcd_binary()
        client_port, peer_port = free_ports(2)
        self.endpoint = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self.log_path = data_dir.with_suffix(".log")
        self._log: IO[bytes] = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                "--name=test",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={self.endpoint}",
                f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--heartbeat-interval=10",
                "--election-timeout=100",
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=error",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + ETCD_START_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"etcd exited with {code} while starting:\n{self.log_tail()}")
            try:
                answer = httpx.get(f"{self.endpoint}/health", timeout=1.0)
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    return
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(
            f"etcd at {self.endpoint} not healthy after {ETCD_START_TIMEOUT} s ({last}):\n"
            f"{self.log_tail()}"
        )

    def log_tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        """Stop etcd and wait for it; idempotent."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


class FakeClock:
    """Wall-clock seconds that move only when told to (the SQLite backend's lock clock)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@contextlib.contextmanager
def not_etcd(status: int, body: bytes, content_type: str) -> Iterator[str]:
    """An HTTP server that answers every POST with ``status`` and ``body``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
