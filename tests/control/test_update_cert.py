"""PUT /v1/cluster/update_cert end to end: control plane, 3 agents, 3 redis-server, real TLS.

Every rejected request is checked three ways: the status, the error body, and that every node
still serves exactly what it served before (by handshake).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from asyncio import run
from pathlib import Path

import pytest
import redis
from certfactory import CA, openssl_ca_and_leaf
from clusterkit import api, served_by_node, served_fingerprint

from clustercert.control.auth import hash_password
from clustercert.control.directory import ClusterDirectory
from clustercert.demo import DemoCluster

UTC = dt.UTC


def _put(cluster: DemoCluster, body: object, **kwargs: object) -> object:
    with api(cluster) as client:
        return client.put("/v1/cluster/update_cert", json=body, **kwargs)  # type: ignore[arg-type]


def _proxy_leaf(ca: CA | None = None) -> tuple[str, str, str]:
    ca = ca or CA.new()
    leaf = ca.issue("redis.example", sans=["redis.example", "127.0.0.1"], eku=["serverAuth"])
    return leaf.full_chain_pem, leaf.key_pem, leaf.fingerprint


def test_update_cert_replaces_the_certificate_on_every_node(cluster: DemoCluster) -> None:
    chain, key, fingerprint = _proxy_leaf()
    before = served_by_node(cluster)
    assert fingerprint not in before.values()

    response = _put(cluster, {"name": "proxy", "certificate": chain, "key": key})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == "proxy"
    assert body["fingerprint_sha256"] == fingerprint
    assert body["generation"] >= 2
    assert [n["served_fingerprint"] for n in body["nodes"]] == [fingerprint] * 3
    assert all(n["ok"] for n in body["nodes"])
    # Each node's proof includes a verifying handshake (chain to the root, serverAuth purpose).
    proofs = [s for n in body["nodes"] for c in n["certificates"] for s in c["services"]]
    assert proofs and all(s["verified"] is True for s in proofs)
    # After 200 a new connection to every node gets the new certificate, with and without SNI.
    assert set(served_by_node(cluster).values()) == {fingerprint}
    for node in cluster.nodes:
        assert served_fingerprint("127.0.0.1", node.redis_port, "redis.example") == fingerprint
    with api(cluster) as client:
        listed = client.get("/v1/cluster/certificates").json()
        assert listed["proxy_cert"].startswith("-----BEGIN CERTIFICATE-----")
        detail = client.get("/v1/cluster/certificates/proxy").json()
    assert detail["fingerprint_sha256"] == fingerprint
    assert all(n["in_sync"] and n["fingerprint"] == fingerprint for n in detail["nodes"])


def test_certificate_made_by_the_openssl_cli_is_installed(
    cluster: DemoCluster, tmp_path: Path
) -> None:
    pair = openssl_ca_and_leaf(tmp_path, common_name="redis.example", key="rsa", days=90)
    body = {"name": "proxy", "certificate": pair.chain, "key": pair.leaf_key.read_text()}
    response = _put(cluster, body)
    assert response.status_code == 200, response.text
    assert set(served_by_node(cluster).values()) == {response.json()["fingerprint_sha256"]}


def test_retrying_a_successful_update_is_a_no_op(cluster: DemoCluster) -> None:
    chain, key, fingerprint = _proxy_leaf()
    first = _put(cluster, {"name": "proxy", "certificate": chain, "key": key})
    second = _put(cluster, {"name": "proxy", "certificate": chain, "key": key})
    assert first.status_code == second.status_code == 200
    assert second.json()["generation"] == first.json()["generation"]
    assert set(served_by_node(cluster).values()) == {fingerprint}


def test_a_client_connected_before_the_rotation_keeps_working(cluster: DemoCluster) -> None:
    node = cluster.nodes[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    cert_file, key_file = cluster.redis_client  # redis requires a client certificate
    client = redis.Redis(
        host="127.0.0.1", port=node.redis_port, ssl=True, ssl_cert_reqs="none",
        ssl_check_hostname=False, single_connection_client=True,
        ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
    )  # fmt: skip
    try:
        assert client.set("before", "1")
        chain, key, fingerprint = _proxy_leaf()
        assert _put(cluster, {"name": "proxy", "certificate": chain, "key": key}).status_code == 200
        assert client.get("before") == b"1"  # same TCP/TLS connection, still serving
        assert client.ping()
    finally:
        client.close()
    assert served_fingerprint("127.0.0.1", node.redis_port) == fingerprint


# --- every error: status, body, and no node changed -------------------------------------------


def _assert_rejected(
    cluster: DemoCluster, response: object, status: int, error_code: str, match: str = ""
) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["error_code"] == error_code
    assert body["description"] == body["message"]
    assert match.lower() in body["description"].lower()
    assert "PRIVATE KEY" not in json.dumps(body)
    return body  # type: ignore[no-any-return]


@pytest.fixture
def unchanged(cluster: DemoCluster):  # type: ignore[no-untyped-def]
    """Asserts, after the test, that every node serves what it served before it."""
    before = served_by_node(cluster)
    yield
    assert served_by_node(cluster) == before


def test_missing_credentials_get_401(cluster: DemoCluster, unchanged: None) -> None:
    chain, key, _ = _proxy_leaf()
    with api(cluster, auth=None) as client:
        response = client.put(
            "/v1/cluster/update_cert", json={"name": "proxy", "certificate": chain, "key": key}
        )
    _assert_rejected(cluster, response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Basic")


def test_wrong_password_gets_401(cluster: DemoCluster, unchanged: None) -> None:
    chain, key, _ = _proxy_leaf()
    with api(cluster, auth=("admin@cluster.local", "wrong")) as client:
        response = client.put(
            "/v1/cluster/update_cert", json={"name": "proxy", "certificate": chain, "key": key}
        )
    _assert_rejected(cluster, response, 401, "unauthorized", "wrong username or password")


def test_a_viewer_gets_403(cluster: DemoCluster, unchanged: None) -> None:
    directory = ClusterDirectory(cluster.directory)
    with directory.open_store() as store:
        state = directory.state(store)
        if run(state.user("viewer@cluster.local")) is None:
            run(
                state.create_user(
                    "viewer@cluster.local", "viewer", "cluster_viewer", hash_password("pw")
                )
            )
    chain, key, _ = _proxy_leaf()
    with api(cluster, auth=("viewer@cluster.local", "pw")) as client:
        response = client.put(
            "/v1/cluster/update_cert", json={"name": "proxy", "certificate": chain, "key": key}
        )
        listed = client.get("/v1/cluster/certificates")
    _assert_rejected(cluster, response, 403, "insufficient_permissions", "update_cluster")
    assert listed.status_code == 200
    assert not [k for k in listed.json() if k.endswith("_key")]
    with api(cluster) as admin:
        assert "proxy_key" in admin.get("/v1/cluster/certificates").json()


def test_body_that_is_not_json_gets_400(cluster: DemoCluster, unchanged: None) -> None:
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/update_cert",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    _assert_rejected(cluster, response, 400, "invalid_json", "not valid JSON")


def test_wrong_media_type_gets_415(cluster: DemoCluster, unchanged: None) -> None:
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/update_cert", content=b"name=proxy", headers={"content-type": "text/plain"}
        )
    _assert_rejected(cluster, response, 415, "unsupported_media_type", "application/json")


def test_body_over_one_mib_gets_413(cluster: DemoCluster, unchanged: None) -> None:
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/update_cert",
            content=b'{"name": "' + b"x" * (1024 * 1024 + 1) + b'"}',
            headers={"content-type": "application/json"},
        )
    _assert_rejected(cluster, response, 413, "payload_too_large", "1 MiB")


@pytest.mark.parametrize(
    "body, match",
    [
        ({"name": "proxy", "certificate": "x", "key": "y", "extra": 1}, "extra"),
        ({"name": "proxy"}, "certificate"),
        ({"name": 5, "certificate": "x", "key": "y"}, "name"),
        (["proxy"], "body"),
    ],
)
def test_schema_errors_get_400(
    cluster: DemoCluster, unchanged: None, body: object, match: str
) -> None:
    _assert_rejected(cluster, _put(cluster, body), 400, "invalid_schema", match)


def test_unknown_name_gets_403(cluster: DemoCluster, unchanged: None) -> None:
    chain, key, _ = _proxy_leaf()
    response = _put(cluster, {"name": "proxyy", "certificate": chain, "key": key})
    _assert_rejected(cluster, response, 403, "unknown_certificate", "proxyy")


def test_key_mismatch_gets_400(cluster: DemoCluster, unchanged: None) -> None:
    chain, _, _ = _proxy_leaf()
    _, other_key, _ = _proxy_leaf()
    response = _put(cluster, {"name": "proxy", "certificate": chain, "key": other_key})
    _assert_rejected(cluster, response, 400, "key_values_mismatch", "does not match")


def test_expired_certificate_gets_406(cluster: DemoCluster, unchanged: None) -> None:
    now = dt.datetime.now(UTC)
    ca = CA.new()
    leaf = ca.issue(
        "redis.example", sans=["redis.example"],
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1),
    )  # fmt: skip
    response = _put(
        cluster, {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    )
    _assert_rejected(cluster, response, 406, "certificate_expired")


def test_incomplete_chain_gets_404(cluster: DemoCluster, unchanged: None) -> None:
    inter = CA.new().intermediate()
    leaf = inter.issue("redis.example", sans=["redis.example"])
    response = _put(cluster, {"name": "proxy", "certificate": leaf.cert_pem, "key": leaf.key_pem})
    _assert_rejected(cluster, response, 404, "issuer_not_found")


def test_leaf_that_is_a_ca_gets_400(cluster: DemoCluster, unchanged: None) -> None:
    ca = CA.new()
    inter = ca.intermediate()
    response = _put(
        cluster,
        {"name": "proxy", "certificate": inter.cert_pem + ca.cert_pem, "key": inter.key_pem},
    )
    _assert_rejected(cluster, response, 400, "leaf_is_ca")


def test_wrong_extended_key_usage_gets_400(cluster: DemoCluster, unchanged: None) -> None:
    ca = CA.new()
    leaf = ca.issue("redis.example", sans=["redis.example"], eku=["clientAuth"])
    response = _put(
        cluster, {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    )
    _assert_rejected(cluster, response, 400, "missing_extended_key_usage", "serverAuth")


def test_unknown_route_and_wrong_method(cluster: DemoCluster) -> None:
    with api(cluster) as client:
        missing = client.get("/v1/nope")
        wrong = client.post("/v1/cluster/update_cert", json={})
    _assert_rejected(cluster, missing, 404, "certificate_not_found", "/v1/nope")
    _assert_rejected(cluster, wrong, 405, "method_not_allowed")


def test_malformed_parameters_are_400_after_authentication(cluster: DemoCluster) -> None:
    with api(cluster) as client:
        bad_id = client.get("/v1/nodes/abc")
        bad_query = client.get("/v1/cluster/certificates/events", params={"limit": "many"})
    _assert_rejected(cluster, bad_id, 400, "invalid_schema", "node_id")
    _assert_rejected(cluster, bad_query, 400, "invalid_schema", "limit")
    with api(cluster, auth=None) as anonymous:
        _assert_rejected(cluster, anonymous.get("/v1/nodes/abc"), 401, "unauthorized")
