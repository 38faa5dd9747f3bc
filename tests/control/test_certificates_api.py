"""The rest of the certificate API (batch PUT, DELETE, rotate, dry run, state, history, nodes)
and the CLI over it, end to end on the shared 3-node cluster."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from certfactory import CA
from clusterkit import api, desired_fingerprints, served_by_node

from clustercert.cli import main
from clustercert.demo import DemoCluster


def _leaf(eku: list[str] | None = None, cn: str = "redis.example") -> Any:
    return CA.new().issue(cn, sans=[cn], eku=["serverAuth"] if eku is None else eku)


def _item(name: str, leaf: Any) -> dict[str, str]:
    return {"name": name, "certificate": leaf.full_chain_pem, "key": leaf.key_pem}


@pytest.fixture
def nothing_changes(cluster: DemoCluster):  # type: ignore[no-untyped-def]
    """After the test: every node serves what it served, and the store desires what it did."""
    served, desired = served_by_node(cluster), desired_fingerprints(cluster)
    yield
    assert served_by_node(cluster) == served
    assert desired_fingerprints(cluster) == desired


def test_batch_put_switches_several_names_together(cluster: DemoCluster) -> None:
    proxy, syncer = _leaf(), _leaf(["serverAuth", "clientAuth"], "syncer.example")
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/certificates",
            json={"certificates": [_item("proxy", proxy), _item("syncer", syncer)]},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        syncer_state = client.get("/v1/cluster/certificates/syncer").json()
    assert [c["fingerprint_sha256"] for c in body["certificates"]] == [
        proxy.fingerprint,
        syncer.fingerprint,
    ]
    assert set(served_by_node(cluster).values()) == {proxy.fingerprint}
    assert all(
        n["in_sync"] and n["fingerprint"] == syncer.fingerprint for n in syncer_state["nodes"]
    )


def test_batch_put_accepts_the_flat_form_redisctl_sends(cluster: DemoCluster) -> None:
    leaf = _leaf()
    with api(cluster) as client:
        response = client.put("/v1/cluster/certificates", json=_item("proxy", leaf))
    assert response.status_code == 200, response.text
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}


def test_batch_with_one_bad_item_changes_nothing_and_lists_every_problem(
    cluster: DemoCluster, nothing_changes: None
) -> None:
    good = _leaf()
    wrong_eku = _leaf(["clientAuth"])
    mismatched = _item("cm", _leaf())
    mismatched["key"] = _leaf().key_pem
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/certificates",
            json={"certificates": [_item("proxy", good), _item("api", wrong_eku), mismatched]},
        )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "missing_extended_key_usage"
    assert [(e["name"], e["error_code"]) for e in body["errors"]] == [
        ("api", "missing_extended_key_usage"),
        ("cm", "key_values_mismatch"),
    ]


def test_batch_incomplete_chain_is_400_not_404(cluster: DemoCluster, nothing_changes: None) -> None:
    leaf = CA.new().intermediate().issue("redis.example", sans=["redis.example"])
    with api(cluster) as client:
        response = client.put(
            "/v1/cluster/certificates",
            json={
                "certificates": [
                    {"name": "proxy", "certificate": leaf.cert_pem, "key": leaf.key_pem}
                ]
            },
        )
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "issuer_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"certificates": [{"name": "proxy", "certificate": "x", "key": "y", "color": "red"}]},
        {"certificates": [], "extra": True},
        {"certificates": []},
        {"certificates": [{"name": "proxy", "certificate": "x"}] * 2},
    ],
)
def test_batch_schema_errors(cluster: DemoCluster, nothing_changes: None, body: Any) -> None:
    with api(cluster) as client:
        response = client.put("/v1/cluster/certificates", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "invalid_schema"


def _write(leaf: Any, directory: Path, stem: str = "leaf") -> tuple[Path, Path]:
    """Write the full chain (the test CA is not trusted by the cluster) and the key."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_text(leaf.full_chain_pem)
    key.write_text(leaf.key_pem)
    return cert, key


def _node_files(cluster: DemoCluster, name: str) -> list[bool]:
    return [(n.directory / "certs" / name).exists() for n in cluster.nodes]


def test_delete_an_optional_certificate_from_the_store_and_every_disk(
    cluster: DemoCluster,
) -> None:
    ldap = _leaf(["clientAuth"], "ldap-client.example")
    with api(cluster) as client:
        assert (
            client.put("/v1/cluster/update_cert", json=_item("ldap_client", ldap)).status_code
            == 200
        )
        assert _node_files(cluster, "ldap_client") == [True] * 3
        key_files = [n.directory / "certs" / "ldap_client" for n in cluster.nodes]
        for directory in key_files:
            generation_dir = next(p for p in directory.iterdir() if p.name.isdigit())
            assert (generation_dir / "key.pem").stat().st_mode & 0o777 == 0o600
            assert generation_dir.stat().st_mode & 0o777 == 0o700
        response = client.delete("/v1/cluster/certificates/ldap_client")
        assert response.status_code == 200, response.text
        assert "ldap_client_cert" not in client.get("/v1/cluster/certificates").json()
        again = client.delete("/v1/cluster/certificates/ldap_client")
    assert _node_files(cluster, "ldap_client") == [False] * 3
    assert again.status_code == 404
    assert again.json()["error_code"] == "certificate_not_found"


@pytest.mark.parametrize(
    "name, status, code",
    [("proxy", 403, "required_certificate"), ("no_such_cert", 404, "certificate_not_found")],
)
def test_delete_errors(
    cluster: DemoCluster, nothing_changes: None, name: str, status: int, code: str
) -> None:
    with api(cluster) as client:
        response = client.delete(f"/v1/cluster/certificates/{name}")
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code


def test_rotate_reissues_an_internal_certificate_on_every_node(cluster: DemoCluster) -> None:
    before = desired_fingerprints(cluster)["metrics_exporter"]
    with api(cluster) as client:
        response = client.post("/v1/cluster/certificates/rotate", json={"name": "metrics_exporter"})
        assert response.status_code == 200, response.text
        detail = client.get("/v1/cluster/certificates/metrics_exporter").json()
    [rotated] = response.json()["certificates"]
    assert rotated["fingerprint_sha256"] != before
    assert detail["source"] == "internal"
    assert all(
        n["in_sync"] and n["fingerprint"] == rotated["fingerprint_sha256"] for n in detail["nodes"]
    )


def test_rotate_without_a_body_reissues_every_internal_certificate(cluster: DemoCluster) -> None:
    before = desired_fingerprints(cluster)
    with api(cluster) as client:
        # The shared cluster may hold user uploads by now (earlier tests): those stay.
        internal = {
            name
            for name in before
            if client.get(f"/v1/cluster/certificates/{name}").json()["source"] == "internal"
        }
        response = client.post("/v1/cluster/certificates/rotate")
    assert response.status_code == 200, response.text
    rotated = {c["name"] for c in response.json()["certificates"]}
    assert "metrics_exporter" in rotated and rotated == internal
    after = desired_fingerprints(cluster)
    assert all(after[n] != before[n] for n in rotated)


@pytest.mark.parametrize(
    "name, status, code",
    [("ldap_client", 403, "not_rotatable"), ("nope", 403, "unknown_certificate")],
)
def test_rotate_errors(
    cluster: DemoCluster, nothing_changes: None, name: str, status: int, code: str
) -> None:
    with api(cluster) as client:
        response = client.post("/v1/cluster/certificates/rotate", json={"name": name})
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code


def test_rotate_refuses_a_user_provided_certificate(cluster: DemoCluster) -> None:
    with api(cluster) as client:
        assert (
            client.put("/v1/cluster/update_cert", json=_item("proxy", _leaf())).status_code == 200
        )
        response = client.post("/v1/cluster/certificates/rotate", json={"name": "proxy"})
    assert response.status_code == 403
    assert response.json()["error_code"] == "not_rotatable"
    assert "user-provided" in response.json()["description"]


def test_validate_is_a_dry_run(cluster: DemoCluster, nothing_changes: None) -> None:
    good, expired_ca = _leaf(), CA.new()
    with api(cluster) as client:
        ok = client.post("/v1/cluster/certificates/validate", json=_item("proxy", good))
        bad = client.post(
            "/v1/cluster/certificates/validate", json=_item("proxy", _leaf(["clientAuth"]))
        )
    assert ok.status_code == 200, ok.text
    assert ok.json()["certificates"][0]["fingerprint_sha256"] == good.fingerprint
    assert bad.status_code == 400
    assert bad.json()["error_code"] == "missing_extended_key_usage"
    del expired_ca


def test_events_record_who_what_and_each_node(cluster: DemoCluster) -> None:
    leaf = _leaf()
    with api(cluster) as client:
        assert client.put("/v1/cluster/update_cert", json=_item("proxy", leaf)).status_code == 200
        page = client.get("/v1/cluster/certificates/events", params={"limit": 2}).json()
        second = client.get(
            "/v1/cluster/certificates/events", params={"limit": 1, "offset": 1}
        ).json()
    newest = page["events"][0]
    assert newest["who"] == "admin@cluster.local"
    assert newest["name"] == "proxy"
    assert newest["new_fingerprint"] == leaf.fingerprint
    assert newest["old_fingerprint"] and newest["old_fingerprint"] != leaf.fingerprint
    assert [n["ok"] for n in newest["nodes"]] == [True] * 3
    assert len(page["events"]) == 2
    assert second["events"] == page["events"][1:2]
    assert "PRIVATE KEY" not in json.dumps(page)


def test_nodes_endpoints(cluster: DemoCluster) -> None:
    with api(cluster) as client:
        nodes = client.get("/v1/nodes").json()
        one = client.get(f"/v1/nodes/{nodes[0]['uid']}").json()
        missing = client.get("/v1/nodes/9999")
    assert sorted(n["name"] for n in nodes) == ["node-1", "node-2", "node-3"]
    assert all(n["in_sync"] for n in nodes)
    assert one["name"] == nodes[0]["name"]
    assert "proxy" in one["certificates"]
    assert missing.status_code == 404


# --- the CLI over the API -------------------------------------------------------------------


@pytest.fixture
def cluster_file(cluster: DemoCluster) -> str:
    return str(cluster.write_cluster_json())


def test_cli_list_and_show(cluster_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certificates", "list", "--cluster-file", cluster_file]) == 0
    listed = capsys.readouterr().out
    assert "proxy" in listed and "3/3" in listed and "days" in listed
    assert main(["certificates", "show", "proxy", "--cluster-file", cluster_file]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "proxy" and "PRIVATE KEY" not in json.dumps(shown)


def test_cli_set_and_rladmin_syntax(
    cluster: DemoCluster, cluster_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = _leaf()
    cert, key = _write(leaf, tmp_path)
    assert main(
        ["certificates", "set", "proxy", "--cert", str(cert), "--key", str(key),
         "--cluster-file", cluster_file]
    ) == 0  # fmt: skip
    assert leaf.fingerprint in capsys.readouterr().out
    other = _leaf()
    cert2, key2 = _write(other, tmp_path, "second")
    assert main(
        ["cluster", "certificate", "set", "proxy", "certificate_file", str(cert2),
         "key_file", str(key2), "--cluster-file", cluster_file]
    ) == 0  # fmt: skip
    assert f"Set proxy certificate to contents of file {cert2}" in capsys.readouterr().out
    assert set(served_by_node(cluster).values()) == {other.fingerprint}


def test_cli_json_stdin_and_full_values_off_a_terminal(
    cluster: DemoCluster,
    cluster_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue #11: `--cert -` reads stdin; `--json` prints the API's answer; a table written to
    a pipe (capsys is not a terminal) carries whole fingerprints, never "…"."""
    leaf = _leaf()
    _, key = _write(leaf, tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(leaf.full_chain_pem))
    assert main(
        ["certificates", "set", "proxy", "--cert", "-", "--key", str(key), "--json",
         "--cluster-file", cluster_file]
    ) == 0  # fmt: skip
    answer = json.loads(capsys.readouterr().out)
    assert answer["fingerprint_sha256"] == leaf.fingerprint
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}

    assert main(["certificates", "list", "--json", "--cluster-file", cluster_file]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["proxy"]["fingerprint_sha256"] == leaf.fingerprint
    assert main(["certificates", "list", "--cluster-file", cluster_file]) == 0
    table = capsys.readouterr().out
    assert leaf.fingerprint in table and "…" not in table
    assert main(["users", "list", "--json", "--cluster-file", cluster_file]) == 0
    assert "admin@cluster.local" in {u["email"] for u in json.loads(capsys.readouterr().out)}

    # Both from stdin cannot work: refused before anything is sent.
    assert main(
        ["certificates", "set", "proxy", "--cert", "-", "--key", "-", "--cluster-file",
         cluster_file]
    ) == 2  # fmt: skip
    assert "only one of --cert and --key" in capsys.readouterr().err
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}


def test_cli_errors_exit_with_the_error_tree_code(
    cluster_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _leaf(["clientAuth"])
    cert, key = _write(bad, tmp_path)
    code = main(
        ["certificates", "set", "proxy", "--cert", str(cert), "--key", str(key),
         "--cluster-file", cluster_file]
    )  # fmt: skip
    assert code == 1
    assert "missing_extended_key_usage" in capsys.readouterr().err
    assert main(["certificates", "delete", "proxy", "--cluster-file", cluster_file]) == 1
    assert "required_certificate" in capsys.readouterr().err
    assert main(["certificates", "list", "--url", "https://127.0.0.1:1", "--user", "a",
                 "--password", "b"]) == 6  # fmt: skip
    assert capsys.readouterr().err == (
        "error: api_unreachable: cannot connect to https://127.0.0.1:1: connection refused\n"
    )


def test_cli_names_an_api_certificate_it_cannot_verify(
    cluster: DemoCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --ca-file the demo API's internal-CA certificate does not verify against the
    system roots: the CLI says so and names the fix, instead of "agent_unavailable"."""
    for name in ("CLUSTERCERT_CA_FILE", "CLUSTERCERT_CLUSTER_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.admin_password is not None
    code = main(["certificates", "list", "--url", cluster.api_url, "--user",
                 "admin@cluster.local", "--password", cluster.admin_password])  # fmt: skip
    assert code == 6
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: api_certificate_untrusted: cannot verify the certificate of {cluster.api_url}: "
    )
    assert "--ca-file" in err


def test_redis_docs_curl_recipe_runs_verbatim(cluster: DemoCluster, tmp_path: Path) -> None:
    """The recipe from Redis Enterprise's docs: PEM flattened with sed -z, curl -k -X PUT."""
    leaf = _leaf()
    cert, key = _write(leaf, tmp_path)
    script = f"""
set -euo pipefail
CERT=$(sed -z 's/\\n/\\\\n/g' {cert})
KEY=$(sed -z 's/\\n/\\\\n/g' {key})
curl -s -k -X PUT -u "admin@cluster.local:{cluster.admin_password}" \\
  -H "Content-Type: application/json" \\
  -d "{{ \\"name\\": \\"proxy\\", \\"key\\": \\"$KEY\\", \\"certificate\\": \\"$CERT\\" }}" \\
  {cluster.api_url}/v1/cluster/update_cert
"""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["fingerprint_sha256"] == leaf.fingerprint
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}


def test_prometheus_metrics(cluster: DemoCluster) -> None:
    leaf = _leaf()
    with api(cluster) as client:
        before = _rollouts_ok(client.get("/metrics").text)
        assert client.put("/v1/cluster/update_cert", json=_item("proxy", leaf)).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _rollouts_ok(text) == before + 1
    assert 'clustercert_certificate_nodes_in_sync{name="proxy"} 3.0' in text
    assert "clustercert_nodes 3.0" in text
    assert 'clustercert_certificate_not_after_timestamp_seconds{name="proxy"}' in text
    assert "PRIVATE KEY" not in text
    with api(cluster, auth=None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401


def _rollouts_ok(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('clustercert_rollouts_total{result="ok"}'):
            return float(line.split()[-1])
    return 0.0
