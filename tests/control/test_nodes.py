"""Nodes on loopback (issue #13): reachable / last_seen / in_sync in GET /v1/nodes, removal
with DELETE /v1/nodes/{uid} and `clustercert nodes remove`, and a node that moved to a new
address. The same across real hosts, partitions included: tests/test_multihost.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from clusterkit import api, proxy_body, put, redis_admin, served_fingerprint, thaw, wait_until
from conftest import start_cluster

from clustercert.cli import main
from clustercert.clock import parse_iso
from clustercert.demo import DemoCluster, free_port

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    # A short watch resync: a frozen agent keeps its watch connection open (the kernel still
    # answers for it), so it is seen unreachable when its watch is due again and its status
    # call times out: within --watch-resync + --agent-timeout.
    cluster = start_cluster(tmp_path_factory, 2, "--watch-resync", "3")
    try:
        yield cluster
    finally:
        thaw(cluster)
        cluster.stop()


def _nodes(cluster: DemoCluster) -> list[dict[str, Any]]:
    with api(cluster) as client:
        answer = client.get("/v1/nodes")
    assert answer.status_code == 200, answer.text
    nodes: list[dict[str, Any]] = answer.json()
    return nodes


def _by_name(cluster: DemoCluster, name: str) -> dict[str, Any]:
    return next(n for n in _nodes(cluster) if n["name"] == name)


def test_a_frozen_node_is_unreachable_and_not_in_sync(two: DemoCluster) -> None:
    first = _by_name(two, "node-1")
    assert first["reachable"] is True and first["in_sync"] is True
    seen = parse_iso(first["last_seen"])
    agent = two.nodes[0].process
    assert agent is not None
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        frozen = wait_until(
            lambda: None if (n := _by_name(two, "node-1"))["reachable"] else n,
            timeout=60, what="node-1 shown unreachable",
        )  # fmt: skip
        assert frozen["in_sync"] is False  # nothing is claimed about a node nobody sees
        assert parse_iso(frozen["last_seen"]) >= seen
        assert _by_name(two, "node-2")["reachable"] is True
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_until(
        lambda: all(n["reachable"] and n["in_sync"] for n in _nodes(two)), timeout=60,
        what="node-1 back in sync",
    )  # fmt: skip


def test_removing_an_unknown_node_is_404_and_changes_nothing(two: DemoCluster) -> None:
    before = _nodes(two)
    with api(two) as client:
        answer = client.delete("/v1/nodes/999")
        events = client.get("/v1/cluster/certificates/events").json()["total"]
    assert answer.status_code == 404
    body = answer.json()
    assert body["error_code"] == "not_found"
    assert body["description"] == body["message"] == "no node with id 999"
    assert [n["uid"] for n in _nodes(two)] == [n["uid"] for n in before]
    with api(two) as client:
        assert client.get("/v1/cluster/certificates/events").json()["total"] == events


def test_a_viewer_cannot_remove_a_node(two: DemoCluster) -> None:
    with api(two) as admin:
        made = admin.post(
            "/v1/users",
            json={"email": "viewer@nodes.test", "password": "viewer-pw-1", "role": "db_viewer"},
        )
    assert made.status_code == 200, made.text
    with api(two, auth=("viewer@nodes.test", "viewer-pw-1")) as viewer:
        answer = viewer.delete(f"/v1/nodes/{_by_name(two, 'node-2')['uid']}")
    assert answer.status_code == 403
    assert answer.json()["error_code"] == "insufficient_permissions"
    assert len(_nodes(two)) == 2


def _env(cluster: DemoCluster) -> dict[str, str]:
    return {
        **os.environ,
        "CLUSTERCERT_URL": cluster.api_url,
        "CLUSTERCERT_USER": "admin@cluster.local",
        "CLUSTERCERT_PASSWORD": cluster.admin_password or "",
        "CLUSTERCERT_CA_FILE": str(cluster.cluster.ca_file),
    }


def test_moving_a_node_takes_a_new_token(two: DemoCluster) -> None:
    node = two.nodes[0]
    uid = _by_name(two, node.name)["uid"]
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(timeout=30)
    config = node.config_file.read_text()
    port = free_port()
    moved = "".join(
        line.replace(f"127.0.0.1:{node.agent_port}", f"127.0.0.1:{port}")
        for line in config.splitlines(keepends=True)
        if not line.startswith("join_token")  # the one it joined with is spent
    )
    node.config_file.write_text(moved)
    refused = subprocess.run(
        [sys.executable, "-m", "clustercert", "agent", "--config", str(node.config_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert (
        f"advertise_url: this node joined as https://127.0.0.1:{node.agent_port} and the control "
        f"plane calls it there, but it is now https://127.0.0.1:{port}; set join_token"
    ) in refused.stderr
    token = subprocess.run(
        [sys.executable, "-m", "clustercert", "join-token", "--dir", str(two.directory)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    node.config_file.write_text(f'join_token = "{token}"\n' + moved)  # before any table
    node.agent_port = port
    two.start_agent(node)
    again = wait_until(
        lambda: (n := _by_name(two, node.name))["agent_url"].endswith(f":{port}")
        and n["in_sync"] and n,
        timeout=60, what="node-1 in sync at its new address",
    )  # fmt: skip
    assert again["uid"] == uid  # the same node, joined again


def test_remove_a_node_then_update_without_it(two: DemoCluster) -> None:
    gone = _by_name(two, "node-2")
    node2 = two.nodes[1]
    old = served_fingerprint("127.0.0.1", node2.redis_port)
    with api(two) as client:
        answer = client.delete(f"/v1/nodes/{gone['uid']}")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "uid": gone["uid"], "name": "node-2", "agent_url": gone["agent_url"], "removed": True
    }  # fmt: skip
    assert [n["name"] for n in _nodes(two)] == ["node-1"]
    with api(two) as client:
        assert client.get(f"/v1/nodes/{gone['uid']}").status_code == 404
        event = client.get("/v1/cluster/certificates/events").json()["events"][0]  # newest
    assert event["action"] == "remove" and event["who"] == "admin@cluster.local"
    assert event["node_id"] == gone["uid"] and event["agent_url"] == gone["agent_url"]
    # Decommissioning the machine is the operator's: its redis stops replicating from the
    # cluster's primary (else the primary's link proof would wait for a replica nobody manages).
    redis_admin(node2).execute_command("REPLICAOF", "NO", "ONE")
    body, fingerprint = proxy_body()
    updated = put(two, body)
    assert updated.status_code == 200, updated.text
    assert [n["name"] for n in updated.json()["nodes"]] == ["node-1"]
    assert served_fingerprint("127.0.0.1", two.nodes[0].redis_port) == fingerprint
    assert served_fingerprint("127.0.0.1", node2.redis_port) == old  # nobody called it
    # Removing it again: 404 through the CLI, exit 5.
    result = subprocess.run(
        [sys.executable, "-m", "clustercert", "nodes", "remove", str(gone["uid"])],
        capture_output=True, text=True, timeout=60, check=False, env=_env(two),
    )  # fmt: skip
    assert result.returncode == 5
    assert f"error: not_found: no node with id {gone['uid']}" in result.stderr


def test_nodes_list_shows_reachability(
    two: DemoCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _env(two)
    code = main(["nodes", "list", "--url", env["CLUSTERCERT_URL"], "--user",
                 env["CLUSTERCERT_USER"], "--password", env["CLUSTERCERT_PASSWORD"],
                 "--ca-file", env["CLUSTERCERT_CA_FILE"]])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "reachable" in out and "last seen" in out and "node-1" in out
