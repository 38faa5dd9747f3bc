"""Multi-host tests in network namespaces that the test creates and deletes (DESIGN §13).

A :class:`Network` is a bridge in a namespace of its own and one namespace per host, each with
one address on the bridge (``10.77.N.x/24``). Every process of a multi-host test runs inside a
host namespace (``ip netns exec``), the operator's commands too, from a "workstation" host:
the root namespace of this machine reaches any address through a sandbox proxy, so a
connection made from there proves nothing. Nothing here targets an address outside the
namespaces it made.

Names carry the test run's pid (``cc<pid>-<host>``), so parallel runs never collide; the
veth pairs are created inside the bridge namespace, so their names never meet the root's.
:meth:`Network.close` always runs (context manager, and ``atexit`` as a last resort): it kills
every process in the namespaces, then deletes them and their ``/etc/netns`` files. Namespaces
left by a run that died (its pid gone) are deleted by the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["Host", "Network", "available"]

PREFIX = "cc"
ETC_NETNS = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def available() -> str | None:
    """None if this machine can run namespace tests; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_all_in(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (bounded: a few rounds)."""
    for _ in range(5):
        pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete(namespace: str) -> None:
    _kill_all_in(namespace)
    _ip("netns", "delete", namespace, check=False)
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


def remove_leftovers() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed mid-test)."""
    for namespace in _namespaces():
        match = _NAME.match(namespace)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _delete(namespace)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the bridge-side end of its link, in the bridge namespace


@dataclass
class Network:
    """A bridge and hosts on ``10.77.<subnet>.0/24``; use as a context manager."""

    subnet: int = field(default_factory=lambda: os.getpid() % 250 + 1)
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # extra /etc/hosts entries: name -> host

    def __post_init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        remove_leftovers()
        _ip("netns", "add", self.bridge)
        atexit.register(self.close)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.bridge)
        _ip("link", "set", "br0", "up", namespace=self.bridge)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace = f"{self.tag}-{name}"
        address = f"10.77.{self.subnet}.{index + 9}"
        veth = f"v{index}"
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace,
            namespace=self.bridge)  # fmt: skip
        _ip("link", "set", veth, "master", "br0", namespace=self.bridge)
        _ip("link", "set", veth, "up", namespace=self.bridge)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _ip("link", "set", "eth0", "up", namespace=namespace)
        _ip("link", "set", "lo", "up", namespace=namespace)
        host = Host(name, namespace, address, veth)
        self.hosts[name] = host
        self.names[name] = name
        self._write_hosts_files()
        return host

    def add_name(self, name: str, host: str) -> None:
        """Make ``name`` resolve to ``host``'s address in every namespace (its /etc/hosts)."""
        self.names[name] = host
        self._write_hosts_files()

    def _write_hosts_files(self) -> None:
        # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts.
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{self.hosts[h].address} {n}" for n, h in sorted(self.names.items())]
        for host in self.hosts.values():
            directory = ETC_NETNS / host.namespace
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join(lines) + "\n")

    def _argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def run(
        self, host: str, argv: Sequence[str], timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to completion (bounded by ``timeout``); output captured."""
        return subprocess.run(
            self._argv(host, argv), capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, **kwargs,
        )  # fmt: skip

    def spawn(
        self, host: str, argv: Sequence[str], log: IO[bytes] | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` in its own session; :meth:`close` stops it."""
        process = subprocess.Popen(
            self._argv(host, argv), stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True, **kwargs,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def link_down(self, host: str) -> None:
        """Cut ``host``'s cable: its end of the link stays up, packets stop at the bridge."""
        _ip("link", "set", self.hosts[host].veth, "down", namespace=self.bridge)

    def link_up(self, host: str) -> None:
        _ip("link", "set", self.hosts[host].veth, "up", namespace=self.bridge)

    def close(self) -> None:
        """Stop every process, delete every namespace; safe to call twice."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        self.processes.clear()
        for host in list(self.hosts.values()):
            _delete(host.namespace)
        self.hosts.clear()
        if self.bridge in _namespaces():
            _delete(self.bridge)
        atexit.unregister(self.close)
