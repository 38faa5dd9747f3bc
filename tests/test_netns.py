"""The namespace harness itself (tests/netns.py): hosts reach each other on the bridge, a cut
link stops traffic and a restored one lets it through, names resolve through each namespace's
/etc/hosts, and close() leaves no namespace and no process behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from netns import Network, available

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

SERVE = (
    "import socket; s = socket.create_server(('0.0.0.0', 7000)); "
    "c, _ = s.accept(); c.sendall(b'hello'); c.close()"
)


def _connect(network: Network, host: str, target: str, timeout: float = 2) -> str:
    code = (
        f"import socket; c = socket.create_connection(({target!r}, 7000), timeout={timeout}); "
        "print(c.recv(5).decode())"
    )
    result = network.run(host, [sys.executable, "-c", code], timeout=30)
    return result.stdout.strip() or result.stderr.strip().splitlines()[-1]


def test_hosts_links_names_and_cleanup() -> None:
    with Network() as network:
        server = network.add_host("server")
        network.add_host("client")
        network.add_name("svc.example", "server")
        names = {h.namespace for h in network.hosts.values()} | {network.bridge}

        network.spawn("server", [sys.executable, "-c", SERVE])
        deadline = time.monotonic() + 20
        answer = ""
        while time.monotonic() < deadline and answer != "hello":
            answer = _connect(network, "client", "svc.example")
            time.sleep(0.1)
        assert answer == "hello"
        resolved = network.run("client", ["getent", "hosts", "svc.example"]).stdout
        assert resolved.split()[0] == server.address

        network.spawn("server", [sys.executable, "-c", SERVE])
        time.sleep(0.5)
        network.link_down("server")
        assert "timed out" in _connect(network, "client", server.address)
        network.link_up("server")
        answer = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and answer != "hello":
            answer = _connect(network, "client", server.address)
        assert answer == "hello"
        sleeper = network.spawn("server", ["sleep", "600"])

    assert sleeper.poll() is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not names & {line.split()[0] for line in left.stdout.splitlines() if line}
