"""Rollouts against nodes that are frozen, gone, late, and the API listener's own certificate.

Each test here gets its own small cluster (real processes), since it leaves nodes stopped or
changes what the API serves.
"""

from __future__ import annotations

import os
import signal
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from certfactory import CA
from clusterkit import (
    accepts,
    api,
    internal_proxy_body,
    proxy_body,
    put,
    served_by_node,
    served_fingerprint,
    thaw,
    wait_until,
)
from conftest import start_cluster

from clustercert.demo import DemoCluster

AGENT_TIMEOUT = 2.0


@pytest.fixture
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(
        tmp_path_factory, 3, "--agent-timeout", str(AGENT_TIMEOUT), "--reconcile-interval", "0.2"
    )
    yield running
    thaw(running)
    running.stop()


def _progress_where(client: httpx.Client, frozen: str) -> dict[str, Any] | None:
    """The live progress once every node but the frozen one has staged (it cannot)."""
    progress: dict[str, Any] = client.get("/v1/cluster/certificates/rollout").json()
    nodes = progress.get("nodes", {})
    others = [state for name, state in nodes.items() if name != frozen]
    if progress.get("in_progress") and nodes.get(frozen) == "staging" and set(others) == {"staged"}:
        return progress
    return None


def _served_or_none(port: int) -> str | None:
    try:
        return served_fingerprint("127.0.0.1", port)
    except OSError:
        return None


def test_frozen_agent_during_stage_gives_409_and_changes_nothing(
    small_cluster: DemoCluster,
) -> None:
    before = served_by_node(small_cluster)
    frozen = small_cluster.nodes[1]
    assert frozen.process is not None
    body, _ = internal_proxy_body(small_cluster)  # no trust phase: the freeze hits the stage
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, api(small_cluster) as watcher:
            call = pool.submit(put, small_cluster, body)
            # While the frozen node holds the stage up, the rollout shows where each node is.
            seen = wait_until(
                lambda: _progress_where(watcher, frozen.name),
                timeout=AGENT_TIMEOUT * 5,
                what="the live progress to show the frozen node staging",
            )
            response = call.result()
            after = watcher.get("/v1/cluster/certificates/rollout").json()
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    assert seen["names"] == ["proxy"] and seen["phase"] == "staging"
    assert sorted(seen["nodes"].values()) == ["staged", "staged", "staging"]
    assert after == {"in_progress": False}
    assert response.status_code == 409, response.text
    answer = response.json()
    assert answer["error_code"] == "nodes_not_updated"
    assert (answer["step"], answer["changed"]) == ("stage", False)
    assert "aborted" in answer["description"] and "no node changed" in answer["description"]
    by_name = {n["name"]: n for n in answer["nodes"]}
    assert by_name[frozen.name]["ok"] is False
    assert by_name[frozen.name]["step"] == "stage"
    assert f"within {AGENT_TIMEOUT}" in by_name[frozen.name]["error"]
    assert served_by_node(small_cluster) == before
    # Nothing was recorded: the store still desires the old certificate. The abort is audited;
    # the frozen node was not sent one (its undecided files are the reconciler's to tidy).
    with api(small_cluster) as client:
        detail = client.get("/v1/cluster/certificates/proxy").json()
        [abort, *_] = client.get("/v1/cluster/certificates/events").json()["events"]
    assert detail["fingerprint_sha256"] == before[small_cluster.nodes[0].name]
    assert (abort["action"], abort["name"], abort["new_fingerprint"]) == ("abort", "proxy", None)
    reasons = {n["name"]: n for n in abort["nodes"]}
    assert reasons[frozen.name]["ok"] is False
    assert reasons[frozen.name]["error"].startswith("not aborted: ")
    assert all(n["ok"] for name, n in reasons.items() if name != frozen.name)


def test_agent_gone_during_stage_gives_409_then_the_node_catches_up(
    small_cluster: DemoCluster,
) -> None:
    before = served_by_node(small_cluster)
    gone = small_cluster.nodes[2]
    assert gone.process is not None
    gone.process.terminate()  # the agent stops, and with it its redis-server
    gone.process.wait(timeout=10)
    body, fingerprint = proxy_body()
    with api(small_cluster) as client:
        response = client.put("/v1/cluster/update_cert", json=body)
    assert response.status_code == 409, response.text
    assert response.json()["error_code"] == "nodes_not_updated"
    alive = {n.name: before[n.name] for n in small_cluster.nodes if n is not gone}
    still = {
        n.name: served_fingerprint("127.0.0.1", n.redis_port)
        for n in small_cluster.nodes
        if n is not gone
    }
    assert still == alive

    # The node comes back: it serves what it had; an update now reaches all three nodes.
    small_cluster.start_agent(gone)
    wait_until(lambda: _served_or_none(gone.redis_port) == before[gone.name], timeout=30)
    wait_until(lambda: accepts(gone.agent_port), timeout=30, what="the agent to listen again")
    with api(small_cluster) as client:
        response = client.put("/v1/cluster/update_cert", json=body)
    assert response.status_code == 200, response.text
    assert set(served_by_node(small_cluster).values()) == {fingerprint}


def test_a_node_that_joins_later_gets_the_desired_certificates(
    small_cluster: DemoCluster,
) -> None:
    body, fingerprint = proxy_body()
    with api(small_cluster) as client:
        assert client.put("/v1/cluster/update_cert", json=body).status_code == 200
    node = small_cluster.add_node("node-4")
    wait_until(
        lambda: _served_or_none(node.redis_port) == fingerprint,
        timeout=30,
        what="the new node to serve the desired proxy certificate",
    )
    small_cluster.wait_in_sync(30)


def test_api_certificate_is_hot_swapped_without_dropping_open_connections(
    small_cluster: DemoCluster,
) -> None:
    ca = CA.new()
    leaf = ca.issue("localhost", sans=["localhost", "127.0.0.1"], eku=["serverAuth"])
    ca_file = small_cluster.directory / "new-api-ca.pem"
    ca_file.write_text(ca.cert_pem)
    with api(small_cluster) as client:
        assert client.get("/v1/nodes").status_code == 200
        before = served_fingerprint("127.0.0.1", small_cluster.api_port)
        response = client.put(
            "/v1/cluster/update_cert",
            json={"name": "api", "certificate": leaf.full_chain_pem, "key": leaf.key_pem},
        )
        assert response.status_code == 200, response.text
        # The connection opened with the old certificate keeps working.
        assert client.get("/v1/nodes").status_code == 200
    assert before != leaf.fingerprint
    assert served_fingerprint("127.0.0.1", small_cluster.api_port) == leaf.fingerprint
    assert served_fingerprint("127.0.0.1", small_cluster.api_port, "localhost") == leaf.fingerprint
    # A new client that trusts only the new CA gets in, with hostname verification.
    with httpx.Client(
        base_url=f"https://localhost:{small_cluster.api_port}",
        verify=ssl.create_default_context(cafile=str(ca_file)),
        auth=("admin@cluster.local", small_cluster.admin_password or ""),
    ) as client:  # fmt: skip
        assert client.get("/v1/nodes").status_code == 200
