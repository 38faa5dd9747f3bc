"""`clustercert demo` as a user runs it: a real process tree, cluster.json as DESIGN §10 shows,
SIGTERM stops everything, and a second start in the same directory works again."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from clusterkit import served_fingerprint, wait_until

from clustercert.demo import CONSOLE_PORT, free_port

pytestmark = pytest.mark.cluster  # runs `clustercert demo` itself


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; only its parent's wait is missing.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def _run_demo(
    directory: Path, port: int, *options: str, nodes: int = 2
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "clustercert", "demo", "--nodes", str(nodes), "--dir",
         str(directory), "--port", str(port), *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    cluster_file = directory / "cluster.json"

    def fresh() -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads(cluster_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return info if info.get("server_pid") else None  # not the stale marker below

    return process, wait_until(fresh, timeout=120, what="a fresh cluster.json")


def _redis_cli(info: dict[str, Any], node: dict[str, Any], *command: str) -> str:
    """The redis-cli command the demo prints, against ``node``."""
    client = info["redis_client"]
    return subprocess.run(
        ["redis-cli", "--tls", "--cert", client["cert_file"], "--key", client["key_file"],
         "--cacert", client["ca_file"], "-p", str(node["redis"]["tls_port"]), *command],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return output


def _occupy(port: int) -> socket.socket | None:
    """Listen on ``port`` (None when something else already does: taken either way)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_demo_writes_cluster_json_and_stops_every_process(tmp_path: Path) -> None:
    port = free_port()
    occupied = _occupy(CONSOLE_PORT)  # the console's default port is taken: the demo picks another
    try:
        process, info = _run_demo(tmp_path / "demo", port)
    finally:
        if occupied is not None:
            occupied.close()
    try:
        assert info["api_url"] == f"https://127.0.0.1:{port}"
        console = str(info["console_url"])
        assert console.startswith("https://127.0.0.1:")
        assert not console.endswith(f":{CONSOLE_PORT}")
        verify = ssl.create_default_context(cafile=str(info["ca_file"]))
        with httpx.Client(verify=verify) as client:  # the cm certificate verifies
            assert client.get(f"{console}/login").status_code == 200
        assert info["username"] and info["password"]
        assert Path(str(info["ca_file"])).is_absolute()
        nodes = info["nodes"]
        assert isinstance(nodes, list) and [n["name"] for n in nodes] == ["node-1", "node-2"]
        pids = [int(str(info["server_pid"]))]
        for node in nodes:
            assert node["agent_url"].startswith("https://127.0.0.1:")
            assert node["redis"]["host"] == "127.0.0.1"
            served_fingerprint("127.0.0.1", node["redis"]["tls_port"])  # TLS answers
            pids += [node["agent_pid"], node["redis"]["pid"]]
        assert all(_alive(pid) for pid in pids)
        assert [n["redis"]["role"] for n in nodes] == ["primary", "replica"]
        # The operator's client certificate opens redis (tls-auth-clients yes), and a write on
        # the primary reaches the replica over the TLS replication link.
        assert _redis_cli(info, nodes[0], "SET", "demo-key", "v1") == "OK"
        wait_until(
            lambda: _redis_cli(info, nodes[1], "GET", "demo-key") == "v1",
            timeout=10, what="the write to reach the replica",
        )  # fmt: skip
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert "curl" in output and "update_cert" in output
    assert f"redis-cli --tls --cert {info['redis_client']['cert_file']}" in output
    assert f"console:   {console}" in output
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if _alive(pid)] == []

    # The same directory again: the nodes keep their identities and ports, and come up in sync.
    # A stale cluster.json is removed at start, so it never describes a cluster that is gone.
    (tmp_path / "demo" / "cluster.json").write_text('{"stale": true}')
    process, again = _run_demo(tmp_path / "demo", port)
    try:
        assert [n["agent_url"] for n in again["nodes"]] == [n["agent_url"] for n in nodes]  # type: ignore[index, union-attr]
    finally:
        _stop(process)
    assert process.returncode == 0


def _cli(info: dict[str, Any], url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustercert", *args, "--url", url, "--user", info["username"],
         "--password", info["password"], "--ca-file", info["ca_file"]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_demo_ha_runs_three_etcd_members_and_two_control_planes(tmp_path: Path) -> None:
    """`clustercert demo --ha`: cluster.json lists both control planes and the three members;
    each member serves the desired ccs_internode_encryption on its client and peer port; the
    CLI works against either control plane, and a rotation of the store's certificate through
    one is seen by the other; SIGTERM stops every process, etcd included."""
    port = free_port()
    process, info = _run_demo(tmp_path / "demo", port, "--ha", nodes=3)
    try:
        planes, members = info["control_planes"], info["etcd"]
        assert planes[0]["api_url"] == info["api_url"] == f"https://127.0.0.1:{port}"
        assert len(planes) == 2 and planes[1]["api_url"] != planes[0]["api_url"]
        assert [m["name"] for m in members] == ["node-1", "node-2", "node-3"]
        pids = [int(info["server_pid"]), *(p["pid"] for p in planes), *(m["pid"] for m in members)]
        pids += [n["agent_pid"] for n in info["nodes"]]
        assert all(_alive(pid) for pid in pids)
        listed = _cli(info, planes[1]["api_url"], "certificates", "show",
                      "ccs_internode_encryption", "--json")  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        desired = json.loads(listed.stdout)["fingerprint_sha256"]
        urls = [m[key] for m in members for key in ("client_url", "peer_url")]
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        assert {served_fingerprint("127.0.0.1", p) for p in ports} == {desired}
        rotated = _cli(info, planes[0]["api_url"], "certificates", "rotate",
                       "ccs_internode_encryption")  # fmt: skip
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        shown = _cli(info, planes[1]["api_url"], "certificates", "show",
                     "ccs_internode_encryption", "--json")  # fmt: skip
        now = json.loads(shown.stdout)["fingerprint_sha256"]
        assert now != desired
        assert {served_fingerprint("127.0.0.1", p) for p in ports} == {now}
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert "etcd" in output
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if _alive(pid)] == []
