"""``clustercert demo --redis cluster``: the nodes' redis-servers form a Redis Cluster whose bus
runs over TLS (``tls-cluster yes``): each node presents ``data_internode_encryption`` on the
bus links it opens and ``proxy`` on those its peers open. After a rotation of either, every
node drops its bus links (``DEBUG CLUSTERLINK KILL``) and proves both directions come back;
the cluster stays ok and serves reads and writes. Real processes; link times are printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from certfactory import CA
from clusterkit import fingerprint, leaf_for, put, redis_admin, served_by_node, trusted_by
from conftest import start_cluster

from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory, 3, redis="cluster")
    yield running
    running.stop()


def _client(cluster: DemoCluster) -> redis.RedisCluster:
    cert_file, key_file = cluster.redis_client
    return redis.RedisCluster(
        host="127.0.0.1", port=cluster.nodes[0].redis_port, ssl=True, ssl_cert_reqs="none",
        ssl_check_hostname=False, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
        socket_timeout=10,
    )  # fmt: skip


def _writes_and_reads(cluster: DemoCluster, tag: str) -> None:
    client = _client(cluster)
    try:
        keys = [f"{tag}-{i}" for i in range(30)]  # spread over every node's slots
        for key in keys:
            assert client.set(key, key)
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]
    finally:
        client.close()


def _cluster_ok(cluster: DemoCluster) -> bool:
    return all(
        redis_admin(n).execute_command("CLUSTER", "INFO").startswith(b"cluster_state:ok")
        for n in cluster.nodes
    )


def _rotate(cluster: DemoCluster, name: str, ca: CA) -> dict[str, Any]:
    leaf = leaf_for(ca, name)
    response = put(cluster, {"name": name, "certificate": leaf.full_chain_pem, "key": leaf.key_pem})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_demo_forms_a_redis_cluster_over_tls(redis_cluster: DemoCluster) -> None:
    assert _cluster_ok(redis_cluster)
    for node in redis_cluster.nodes:
        assert redis_admin(node).config_get("tls-cluster") == {"tls-cluster": "yes"}
    assert [n["redis"]["role"] for n in redis_cluster.describe()["nodes"]] == ["primary"] * 3
    _writes_and_reads(redis_cluster, "formed")


@pytest.mark.parametrize("name", ["proxy", "data_internode_encryption"])
def test_a_rotation_to_a_new_ca_relinks_the_whole_bus(
    redis_cluster: DemoCluster, name: str
) -> None:
    ca = CA.new()
    body = _rotate(redis_cluster, name, ca)
    print()
    for node in body["nodes"]:
        (link,) = [k for c in node["certificates"] for k in c.get("links", [])]
        assert link["ok"], link
        assert link["link"] == "cluster bus to 2 node(s)"
        print(f"  {node['name']}: cluster bus relinked in {link['seconds']} s after {name}")
    assert all(fingerprint(ca.cert) in trusted_by(n) for n in redis_cluster.nodes)
    if name == "proxy":
        assert set(served_by_node(redis_cluster).values()) == {body["fingerprint_sha256"]}
    assert _cluster_ok(redis_cluster)
    _writes_and_reads(redis_cluster, name)
