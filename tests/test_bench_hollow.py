"""Smoke test of the hollow nodes (bench/hollow.py), the load generator of ``make bench-scale``:
they join through the real join flow and a rotation through the real control plane reaches
them. It proves the load generator works, nothing about agents."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from certfactory import CA
from clusterkit import api, proxy_body, wait_until
from conftest import start_cluster

from bench.hollow import HollowNode, Refused
from clustercert import pki
from clustercert.clock import utc_now
from clustercert.control.state import run_blocking
from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
NODES = 5


@pytest.fixture
def hollow_cluster(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> Iterator[tuple[DemoCluster, list[dict[str, object]]]]:
    cluster = start_cluster(tmp_path_factory, 0)
    with cluster.cluster.open_store() as store:
        state = cluster.cluster.state(store)
        tokens = [
            run_blocking(state.new_join_token(utc_now(), dt.timedelta(minutes=10)))
            for _ in range(NODES)
        ]
    spec = {
        "api_url": cluster.api_url,
        "ca_file": str(cluster.cluster.ca_file),
        "work_dir": str(tmp_path),
        "nodes": [{"name": f"hollow-{i}", "token": t} for i, t in enumerate(tokens, 1)],
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.hollow"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(spec))
        process.stdin.close()
        ready = json.loads(process.stdout.readline())["nodes"]
        yield cluster, ready
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()
        cluster.stop()


def test_hollow_nodes_join_and_take_a_rotation(
    hollow_cluster: tuple[DemoCluster, list[dict[str, object]]],
) -> None:
    cluster, ready = hollow_cluster
    assert sorted(str(n["name"]) for n in ready) == [f"hollow-{i}" for i in range(1, NODES + 1)]
    with api(cluster) as client:
        wait_until(
            lambda: all(n["in_sync"] for n in client.get("/v1/nodes").json()),
            timeout=60,
            what="the hollow nodes to take the desired certificates",
        )
        body, fingerprint = proxy_body()
        response = client.put("/v1/cluster/update_cert", json=body)
        assert response.status_code == 200, response.text
        nodes = response.json()["nodes"]
        assert len(nodes) == NODES
        assert {n["served_fingerprint"] for n in nodes} == {fingerprint}  # the synthetic proof


def test_a_hollow_node_pins_roots_and_reports_them_as_an_agent_does() -> None:
    """In-process, no control plane: what the trust phase and the reconciler read."""
    node = HollowNode("hollow-1", 1)
    ca = CA.new()
    fingerprint = pki.fingerprint_sha256(ca.cert)
    request = json.dumps({"roots": [ca.cert_pem]}).encode()
    answer = asyncio.run(node.route("PUT", "/internal/trust", request))
    assert answer == {"pinned": [fingerprint], "bundles": {}}
    assert asyncio.run(node.route("GET", "/internal/status", b""))["pinned"] == [fingerprint]
    with pytest.raises(Refused, match="not a PEM certificate"):
        asyncio.run(node.route("PUT", "/internal/trust", b'{"roots": ["nonsense"]}'))
    assert node.pinned == (fingerprint,)  # a refused request changed nothing
