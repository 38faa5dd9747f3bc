"""Event-driven node status with real processes (docs/decisions.md, "Node status without
polling"): the control plane watches nodes known in sync instead of polling them, and still
finds out by itself when one restarts.

The cluster runs with a watch resync far longer than any wait here, so only the watch ending
(the agent stopped, or came back as another incarnation) can explain a node converging.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from clusterkit import api, proxy_body, put, served_fingerprint, wait_until
from conftest import start_cluster

from clustercert.control.agents import internode_client_context
from clustercert.demo import DemoCluster, DemoNode
from clustercert.internode import StatusAnswer

pytestmark = pytest.mark.cluster

RESYNC = "600"  # seconds: longer than every wait below


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(
        tmp_path_factory, 2, "--reconcile-interval", "0.2", "--watch-resync", RESYNC
    )
    yield running
    running.stop()


def _current_file(node: DemoNode) -> Path:
    return node.directory / "certs" / "proxy" / "current"


def _internode(cluster: DemoCluster, node: DemoNode) -> httpx.Client:
    """A client holding the control plane's own internode identity (mutual TLS)."""
    directory = cluster.cluster
    context = internode_client_context(
        directory.ca_file, directory.identity_cert, directory.identity_key
    )
    return httpx.Client(base_url=node.agent_url, verify=context, timeout=30)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restarted_node_with_old_files_converges_without_api_calls(
    watched: DemoCluster, how: str
) -> None:
    """The node's files are rolled back to the previous generation while its agent is down
    (a restore from backup); the restarted agent holds the old certificate, and the control
    plane pushes the desired one again on its own."""
    cluster = watched
    body, desired = proxy_body()
    assert put(cluster, body).status_code == 200  # the last API call of this test
    node = cluster.nodes[1]
    assert node.process is not None
    generation = int(_current_file(node).read_text())
    with _internode(cluster, node) as client:
        boot_before = StatusAnswer.from_json(client.get("/internal/status").json()).boot_id
    assert boot_before

    node.process.send_signal(getattr(signal, how))
    node.process.wait(timeout=15)  # a held watch does not keep a stopping agent alive
    _current_file(node).write_text(f"{generation - 1}\n")
    cluster.start_agent(node)

    def converged() -> bool:
        try:
            served = served_fingerprint("127.0.0.1", node.redis_port)
        except OSError:
            return False
        return served == desired and int(_current_file(node).read_text()) == generation

    wait_until(converged, timeout=30, what=f"{node.name} to be brought back after {how}")
    with _internode(cluster, node) as client:
        status = StatusAnswer.from_json(client.get("/internal/status").json())
    assert status.boot_id not in (None, boot_before)  # a new incarnation, told apart
    assert status.certificates["proxy"].fingerprint == desired
    with api(cluster) as client:
        assert all(n["in_sync"] for n in client.get("/v1/nodes").json())


def test_a_watch_answers_at_once_for_another_incarnation_and_is_refused_bad_input(
    watched: DemoCluster,
) -> None:
    node = watched.nodes[0]
    with _internode(watched, node) as client:
        first = StatusAnswer.from_json(client.get("/internal/status").json())
        # The caller knew another incarnation: answered without waiting out the 600 s.
        other = client.get("/internal/status", params={"wait": "600", "boot": "not-this-one"})
        assert other.status_code == 200
        assert StatusAnswer.from_json(other.json()).boot_id == first.boot_id
        held = client.get("/internal/status", params={"wait": "0.2", "boot": first.boot_id})
        assert held.status_code == 200
        assert StatusAnswer.from_json(held.json()) == first
        bad = client.get("/internal/status", params={"wait": "soon"})
        assert bad.status_code == 422
        assert bad.json() == {"error": "wait must be a number of seconds, got 'soon'"}
        after = StatusAnswer.from_json(client.get("/internal/status").json())
    assert after == first  # nothing changed
