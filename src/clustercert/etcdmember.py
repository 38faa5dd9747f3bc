"""An etcd member secured by ``ccs_internode_encryption``: its files, command line and process.

The cluster configuration store (Redis Enterprise's CCS; ours is etcd) serves the
``ccs_internode_encryption`` certificate on its client port and its peer port, and presents it
to its peers. Layout of a member's directory::

    DIR/tls/current      symlink to the directory holding cert.pem and key.pem; etcd is
                         pointed at DIR/tls/current/cert.pem and .../key.pem
    DIR/ca.pem           the trusted CA bundle, for clients (--trusted-ca-file) and peers
                         (--peer-trusted-ca-file)
    DIR/data/            etcd's data directory
    DIR/etcd.pid         the running member's process id; DIR/etcd.log its output

etcd 3.4 reads its certificate and key files again on every new handshake (checked with 3.4.23:
a connection after the files changed gets the new certificate, connections already open keep
theirs), so a rotation switches ``tls/current`` with one rename (:func:`point_at`, as
Kubernetes' atomic writer does): certificate and key change together, nothing is restarted.
The trusted CA file is read only when etcd starts: a new root is loaded by restarting the
member (:func:`restart`), one member at a time (the control plane pins a new root node after
node, control/trust.py), so the cluster keeps its quorum.

Members run in their own session: an agent that stops or restarts leaves its member running
(the member is the whole cluster's store, not the node's).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from clustercert.certfiles import write_atomically

__all__ = ["MemberSpec", "health", "point_at", "restart", "running_pid", "start", "stop"]


@dataclass(frozen=True)
class MemberSpec:
    """One member: ``initial_cluster`` is etcd's ``name=peer_url,...`` of every member."""

    name: str
    directory: Path
    client_url: str
    peer_url: str
    initial_cluster: str
    binary: str = "etcd"

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    @property
    def cert_file(self) -> Path:
        return self.tls_dir / "current" / "cert.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_dir / "current" / "key.pem"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def pid_file(self) -> Path:
        return self.directory / "etcd.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "etcd.log"

    @property
    def client_address(self) -> tuple[str, int]:
        return _address(self.client_url)

    @property
    def peer_address(self) -> tuple[str, int]:
        return _address(self.peer_url)

    def argv(self) -> list[str]:
        """etcd's command line: TLS with client certificates required on both ports."""
        cert, key, ca = str(self.cert_file), str(self.key_file), str(self.ca_file)
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.directory / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",  # ignored once the data directory exists
            "--cert-file", cert, "--key-file", key,
            "--client-cert-auth", "--trusted-ca-file", ca,
            "--peer-cert-file", cert, "--peer-key-file", key,
            "--peer-client-cert-auth", "--peer-trusted-ca-file", ca,
        ]  # fmt: skip


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.port is None:
        raise ValueError(f"expected https://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port


def point_at(spec: MemberSpec, source: Path) -> None:
    """Make ``tls/current`` name ``source`` (a directory with cert.pem and key.pem) in one
    rename: a handshake sees the old pair or the new one. Durable (the directory is fsynced)."""
    spec.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    link = spec.tls_dir / "current"
    with contextlib.suppress(OSError):
        if os.readlink(link) == str(source):
            return
    tmp = spec.tls_dir / f".current-{secrets.token_hex(4)}"
    os.symlink(source, tmp)
    os.replace(tmp, link)
    fd = os.open(spec.tls_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bootstrap(spec: MemberSpec, cert_pem: str, key_pem: str, ca_pem: str) -> None:
    """The files a member needs before any agent manages it (the store does not exist yet):
    the pair in ``tls/bootstrap/`` (current until the node's agent commits a generation) and
    the trusted CA bundle."""
    bootstrap = spec.tls_dir / "bootstrap"
    bootstrap.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(bootstrap / "cert.pem", cert_pem.encode(), 0o644)
    write_atomically(bootstrap / "key.pem", key_pem.encode())
    write_atomically(spec.ca_file, ca_pem.encode(), 0o644)
    point_at(spec, bootstrap)


def running_pid(spec: MemberSpec) -> int | None:
    """The pid of the member's process when it runs (per its pid file), else None."""
    _reap()
    try:
        pid = int(spec.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    with contextlib.suppress(OSError):  # a zombie child of ours does not run
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return None
    return pid


# The members this process started, by pid: kept so that they are reaped when they stop (and
# their Popen is not collected while they run).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    """Collect the members this process started that have exited (whoever stopped them)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


def start(spec: MemberSpec) -> int:
    """Start the member in its own session (it outlives whoever started it); writes the pid
    file and returns the pid. Does not wait for it to answer (see :func:`wait_healthy`)."""
    spec.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with spec.log_file.open("ab") as log:
        process = subprocess.Popen(
            spec.argv(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    write_atomically(spec.pid_file, str(process.pid).encode(), 0o644)
    _CHILDREN[process.pid] = process
    return process.pid


def stop(spec: MemberSpec, timeout: float = 10.0) -> None:
    """SIGTERM the running member and wait (bounded) until it is gone; SIGKILL after that."""
    pid = running_pid(spec)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    child = _CHILDREN.get(pid)
    while running_pid(spec) is not None and (child is None or child.poll() is None):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    if child is not None:
        child.wait()  # it is gone (or a zombie): reap it
        _CHILDREN.pop(pid, None)


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A client of the member: trusts ``ca_file`` and presents ``cert_file``/``key_file``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(cert_file, key_file)
    return context


def health(url: str, context: ssl.SSLContext, timeout: float = 2.0) -> str | None:
    """None when etcd's ``/health`` at ``url`` says healthy (the member has a leader and
    serves), else why not."""
    host, port = _address(url)
    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        connection.request("GET", "/health")
        answer = connection.getresponse()
        body = answer.read().decode(errors="replace")
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return f"{url}/health: {type(exc).__name__}: {exc}"
    finally:
        connection.close()
    if answer.status != 200 or '"health":"true"' not in body.replace(" ", ""):
        return f"{url}/health answered {body[:200]!r}"
    return None


def wait_healthy(url: str, context: ssl.SSLContext, timeout: float) -> str | None:
    """Poll :func:`health` until it says healthy (None) or ``timeout`` passes (the last
    reason)."""
    deadline = time.monotonic() + timeout
    while True:
        reason = health(url, context, timeout=min(2.0, timeout))
        if reason is None or time.monotonic() >= deadline:
            return reason
        time.sleep(0.05)


def restart(spec: MemberSpec, context: ssl.SSLContext, timeout: float) -> str | None:
    """Stop the member, start it again, wait until it is healthy: None, or why not."""
    stop(spec)
    start(spec)
    return wait_healthy(spec.client_url, context, timeout)
