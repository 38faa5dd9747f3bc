"""Helpers for the store contract suite: a real etcd process, a fake clock, a not-etcd server.

The pytest fixtures built from these live in ``tests/store/test_contract.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
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


def wait_healthy(url: str, process: subprocess.Popen[bytes] | None) -> str | None:
    """Until the etcd at ``url`` answers /health with a leader: None, or (after
    ETCD_START_TIMEOUT, or at once if ``process`` is not running) why not."""
    deadline = time.monotonic() + ETCD_START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            return f"not running (exit code {code}; last: {last})"
        try:
            answer = httpx.get(f"{url}/health", timeout=1.0)
            if answer.status_code == 200 and answer.json().get("health") == "true":
                return None
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    return f"not healthy after {ETCD_START_TIMEOUT} s ({last})"


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
        problem = wait_healthy(self.endpoint, self._process)
        if problem is not None:
            raise RuntimeError(f"etcd at {self.endpoint}: {problem}:\n{self.log_tail()}")

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


class EtcdCluster:
    """Three etcd members on loopback (plain HTTP), each killable and restartable with its data.

    The same short heartbeat and election timeouts as :class:`EtcdProcess` (a new leader within
    a fraction of a second). ``store_url(prefix)`` names every member, as an operator would."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        self.binary = etcd_binary()
        ports = free_ports(2 * size)
        self.names = [f"m{i}" for i in range(1, size + 1)]
        self.client_urls = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(size)]
        self.peer_urls = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(size)]
        self.base_dir = base_dir
        self.initial = ",".join(f"{n}={u}" for n, u in zip(self.names, self.peer_urls, strict=True))
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size
        try:
            for index in range(size):
                self._launch(index, "new")
            for index in range(size):
                self.wait_healthy(index)
        except BaseException:
            self.stop()
            raise

    def store_url(self, prefix: str) -> str:
        members = ",".join(u.removeprefix("http://") for u in self.client_urls)
        return f"etcd://{members}/{prefix}"

    def _launch(self, index: int, state: str) -> None:
        name = self.names[index]
        log = (self.base_dir / f"{name}.log").open("ab")
        self._logs[index] = log
        self._processes[index] = subprocess.Popen(
            [
                self.binary,
                f"--name={name}",
                f"--data-dir={self.base_dir / name}",
                f"--listen-client-urls={self.client_urls[index]}",
                f"--advertise-client-urls={self.client_urls[index]}",
                f"--listen-peer-urls={self.peer_urls[index]}",
                f"--initial-advertise-peer-urls={self.peer_urls[index]}",
                f"--initial-cluster={self.initial}",
                f"--initial-cluster-state={state}",
                "--initial-cluster-token=clustercert-test",
                "--heartbeat-interval=20",
                "--election-timeout=200",
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=error",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, index: int) -> None:
        """Until member ``index`` answers /health with a leader (bounded)."""
        problem = wait_healthy(self.client_urls[index], self._processes[index])
        if problem is not None:
            raise RuntimeError(f"etcd member {self.names[index]}: {problem}")

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (its data stays for :meth:`restart`)."""
        process = self._processes[index]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        log = self._logs[index]
        if log is not None:
            log.close()
        self._processes[index] = None

    def restart(self, index: int) -> None:
        """Start member ``index`` again on its data; returns once it serves without waiting
        for a quorum (with a majority down it cannot become healthy)."""
        self._launch(index, "existing")

    def stop(self) -> None:
        for index in range(len(self.names)):
            self.kill(index)


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
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free loopback port in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def not_etcd(status: int, body: bytes, content_type: str) -> contextlib.AbstractContextManager[str]:
    """An HTTP server that answers every POST with ``status`` and ``body``; yields its URL."""

    class Handler(_Quiet):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return serving(Handler)


def dying_member(upstream: str, forward: bool) -> contextlib.AbstractContextManager[str]:
    """A member that dies with a transaction in flight: it forwards each ``kv/txn`` to the real
    etcd at ``upstream`` (when ``forward``: the write lands) or not, then resets the connection
    without an answer, as a member killed mid-request does. Yields its URL."""

    class Handler(_Quiet):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if forward and self.path.endswith("/kv/txn"):
                httpx.post(f"{upstream}{self.path}", content=body, timeout=5.0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    return serving(Handler)
