"""Two control planes sharing one etcd (DESIGN §9): a real etcd, two `clustercert server`
processes over the same cluster directory, two agents with redis-server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from certfactory import CA
from clusterkit import api, served_by_node, wait_until
from conftest import ADMIN_PASSWORD
from store_fixtures import EtcdProcess

from clustercert.demo import DemoCluster, free_port


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    process = EtcdProcess(tmp_path / "etcd")
    yield process
    process.stop()


def test_two_control_planes_share_one_etcd(etcd: EtcdProcess, tmp_path: Path) -> None:
    endpoint = etcd.endpoint.removeprefix("http://")
    cluster = DemoCluster(
        tmp_path / "cluster",
        nodes_count=2,
        api_port=free_port(),
        console_port=free_port(),
        admin_password=ADMIN_PASSWORD,
        store_url=f"etcd://{endpoint}/clustercert-e2e/",
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        assert not (cluster.directory / "store.db").exists()  # the state lives in etcd
        second_port = free_port()
        second = subprocess.Popen(
            [sys.executable, "-m", "clustercert", "server", "--dir", str(cluster.directory),
             "--listen", f"127.0.0.1:{second_port}",
             "--console-listen", f"127.0.0.1:{free_port()}"],  # each its own console port
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        other = DemoCluster(cluster.directory, api_port=second_port, admin_password=ADMIN_PASSWORD)
        wait_until(lambda: _answers(other), timeout=60, what="the second control plane")

        first_leaf = CA.new().issue("redis.example", sans=["redis.example"], eku=["serverAuth"])
        with api(cluster) as client:
            response = client.put(
                "/v1/cluster/update_cert",
                json={"name": "proxy", "certificate": first_leaf.full_chain_pem,
                      "key": first_leaf.key_pem},
            )  # fmt: skip
        assert response.status_code == 200, response.text
        with api(other) as client:
            seen = client.get("/v1/cluster/certificates/proxy").json()
        assert seen["fingerprint_sha256"] == first_leaf.fingerprint
        assert all(n["in_sync"] for n in seen["nodes"])

        # The other control plane updates next; both share the lock and the desired state.
        second_leaf = CA.new().issue("redis.example", sans=["redis.example"], eku=["serverAuth"])
        with api(other) as client:
            response = client.put(
                "/v1/cluster/update_cert",
                json={"name": "proxy", "certificate": second_leaf.full_chain_pem,
                      "key": second_leaf.key_pem},
            )  # fmt: skip
        assert response.status_code == 200, response.text
        assert set(served_by_node(cluster).values()) == {second_leaf.fingerprint}
        with api(cluster) as client:
            events = client.get("/v1/cluster/certificates/events", params={"limit": 10}).json()
        # Certificate events only: each new root also has its trust events (docs/api.md).
        updates = [e["new_fingerprint"] for e in events["events"] if e.get("name") == "proxy"]
        assert updates[:2] == [second_leaf.fingerprint, first_leaf.fingerprint]
    finally:
        if second is not None:
            second.terminate()
            second.wait(timeout=10)
        cluster.stop()


def _answers(cluster: DemoCluster) -> bool:
    try:
        with api(cluster) as client:
            return client.get("/v1/nodes").status_code == 200
    except httpx.HTTPError:
        return False
