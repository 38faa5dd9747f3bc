"""Certificates that never expire unnoticed, against real processes: the control plane's
settings API, its alerts and their webhook, and the rotation job renewing short-lived internal
certificates while redis clients keep opening new TLS connections.

Time is a parameter: the renewal test's cluster issues internal certificates that live two
minutes, so the job's window (two thirds of that) opens 40 s after issue instead of 30 days.
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from certfactory import CA
from clusterkit import api, served_by_node, wait_until
from conftest import start_cluster
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from webhook_receiver import Receiver, webhook_receiver

from clustercert import pki
from clustercert.cli import main
from clustercert.clock import parse_iso
from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster

CLUSTER_ALERT = "cluster_certs_about_to_expire"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(script=[500]) as running:
        yield running


@pytest.fixture(scope="module")
def alerting(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[DemoCluster]:
    """One node, default validity, trusting the test webhook receiver's CA."""
    cluster = start_cluster(tmp_path_factory, 1, "--webhook-ca-file", str(receiver.ca_file))
    yield cluster
    cluster.stop()


def _proxy(days: int) -> dict[str, str]:
    now = dt.datetime.now(dt.UTC)
    leaf = CA.new().issue(
        "redis.example", sans=["redis.example", "localhost", "127.0.0.1"], eku=["serverAuth"],
        not_after=now + dt.timedelta(days=days),
    )  # fmt: skip
    return {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}


def _alert(client: httpx.Client, name: str = CLUSTER_ALERT) -> dict[str, Any]:
    response = client.get("/v1/cluster/alerts")
    assert response.status_code == 200, response.text
    return response.json()[name]  # type: ignore[no-any-return]


# --- settings ------------------------------------------------------------------------------


def test_settings_read_change_and_audit(alerting: DemoCluster) -> None:
    with api(alerting) as client:
        before = client.get("/v1/cluster")
        assert before.status_code == 200, before.text
        assert before.json() == {
            "name": "cluster.local",
            "alert_settings": {
                "cluster_certs_about_to_expire": {"enabled": True, "threshold": 45},
                "node_internal_certs_about_to_expire": {"enabled": True, "threshold": 45},
                "webhook_url": None,
            },
            "cert_rotation_job_settings": {"enabled": True, "expiry_days_before_rotation": 60},
        }
        change = {"cert_rotation_job_settings": {"expiry_days_before_rotation": 30}}
        changed = client.put("/v1/cluster", json=change)
        assert changed.status_code == 200, changed.text
        assert changed.json()["cert_rotation_job_settings"] == {
            "enabled": True, "expiry_days_before_rotation": 30,
        }  # fmt: skip
        assert client.get("/v1/cluster").json() == changed.json()
        event = client.get("/v1/cluster/certificates/events").json()["events"][0]
        assert event["action"] == "settings" and event["who"] == "admin@cluster.local"
        assert event["changes"] == {
            "cert_rotation_job_settings.expiry_days_before_rotation": {"old": 60, "new": 30}
        }
        restore = {"cert_rotation_job_settings": {"expiry_days_before_rotation": 60}}
        assert client.put("/v1/cluster", json=restore).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code", "match"),
    [
        ({"alert_settings": {"nope": 1}}, 400, "invalid_schema", "alert_settings.nope: Extra"),
        (
            {"alert_settings": {"cluster_certs_about_to_expire": {"threshold": "45"}}},
            400, "invalid_schema", "threshold: Input should be a valid integer",
        ),
        (
            {"cert_rotation_job_settings": {"expiry_days_before_rotation": 91}},
            400, "invalid_schema", "less than or equal to 90",
        ),
        ({"alert_settings": {"webhook_url": "http://x.example/"}}, 400, "invalid_schema",
         "must be an https:// URL"),
        ({"name": "renamed.example"}, 400, "invalid_schema", "cannot be renamed"),
        ({"unknown": True}, 400, "invalid_schema", "unknown: Extra inputs"),
        ([], 400, "invalid_schema", "valid dictionary"),
    ],
)  # fmt: skip
def test_rejected_settings_change_nothing(
    alerting: DemoCluster, body: Any, status: int, code: str, match: str
) -> None:
    with api(alerting) as client:
        before = client.get("/v1/cluster").json()
        events = client.get("/v1/cluster/certificates/events").json()["total"]
        response = client.put("/v1/cluster", json=body)
        assert response.status_code == status, response.text
        answer = response.json()
        assert answer["error_code"] == code and match in answer["description"]
        assert answer["description"] == answer["message"]
        assert client.get("/v1/cluster").json() == before
        assert client.get("/v1/cluster/certificates/events").json()["total"] == events


def test_settings_need_json_and_update_cluster(alerting: DemoCluster) -> None:
    with api(alerting) as admin:
        before = admin.get("/v1/cluster").json()
        wrong_type = admin.put("/v1/cluster", content=b"{}", headers={"Content-Type": "text/x"})
        assert wrong_type.status_code == 415
        assert wrong_type.json()["error_code"] == "unsupported_media_type"
        viewer = {
            "email": "viewer@lifecycle.test",
            "password": "viewer-pw",
            "role": "cluster_viewer",
        }
        assert admin.post("/v1/users", json=viewer).status_code == 200
    with api(alerting, auth=("viewer@lifecycle.test", "viewer-pw")) as client:
        assert client.get("/v1/cluster").status_code == 200
        assert client.get("/v1/cluster/alerts").status_code == 200
        refused = client.put("/v1/cluster", json={"alert_settings": {}})
        assert refused.status_code == 403
        assert refused.json()["error_code"] == "insufficient_permissions"
    with api(alerting) as admin:
        assert admin.get("/v1/cluster").json() == before


def test_the_control_plane_exports_the_expiry_of_its_own_files(alerting: DemoCluster) -> None:
    """Its API and console listeners' certificates, its internode identity and the internal
    CA, in the agents' series (so the same Prometheus rules watch them)."""
    with api(alerting) as client:
        before = time.time()
        text = client.get("/metrics").text
        after = time.time()
        api_detail = client.get("/v1/cluster/certificates/api").json()
    node = f"control-plane@127.0.0.1:{alerting.api_port}"
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "node_cert_expiration_seconds":
                assert sample.labels["node"] == node and sample.labels["cluster"] == "cluster.local"
                found[sample.labels["logical_name"]] = (Path(sample.labels["path"]), sample.value)
    assert set(found) == {"api", "cm", "control_plane_identity", "internal_ca"}
    directory = alerting.cluster
    assert found["internal_ca"][0] == directory.ca_file
    assert found["control_plane_identity"][0] == directory.identity_cert
    served = x509.load_pem_x509_certificates(found["api"][0].read_bytes())[0]
    assert pki.fingerprint_sha256(served) == api_detail["fingerprint_sha256"]
    for path, seconds in found.values():
        expiry = x509.load_pem_x509_certificates(path.read_bytes())[0].not_valid_after_utc
        assert expiry.timestamp() - after <= seconds <= expiry.timestamp() - before


# --- alerts and the webhook ------------------------------------------------------------------


def test_an_alert_raises_and_clears_and_the_webhook_gets_both(
    alerting: DemoCluster, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user proxy 10 days from expiry raises cluster_certs_about_to_expire (the rotation job
    leaves it alone); a successor clears it. The receiver fails the first call (500): the
    raise still arrives, retried, before the clear."""
    with api(alerting) as client:
        assert (
            client.put(
                "/v1/cluster", json={"alert_settings": {"webhook_url": receiver.url}}
            ).status_code
            == 200
        )
        expiring = client.put("/v1/cluster/update_cert", json=_proxy(10))
        assert expiring.status_code == 200, expiring.text
        fingerprint = expiring.json()["fingerprint_sha256"]
        raised = wait_until(
            lambda: (a := _alert(client))["state"] and a, timeout=60, what="the alert raised"
        )
        (affected,) = raised["change_value"]["certificates"]
        assert (affected["name"], affected["source"]) == ("proxy", "user")
        assert affected["nodes"] == ["node-1"]
        assert 9 * 86400 < affected["seconds_left"] <= 10 * 86400
        active = 'clustercert_alert_active{alert="cluster_certs_about_to_expire"} 1.0'
        # The metric follows the loop's pass (every 5 s); the API evaluates on demand.
        wait_until(lambda: active in client.get("/metrics").text, timeout=30, what="the metric")
        # The rotation job never replaces a user certificate, however close to expiry.
        time.sleep(6)  # more than one pass of the loop (5 s)
        assert client.get("/v1/cluster/certificates/proxy").json()["fingerprint_sha256"] == (
            fingerprint
        )
        events = client.get("/v1/cluster/certificates/events").json()["events"]
        assert not [e for e in events if e["who"] == "rotation-job"]

        assert main(["alerts", "--cluster-file", str(alerting.write_cluster_json())]) == 0
        shown = capsys.readouterr().out
        assert "cluster_certs_about_to_expire" in shown and "RAISED" in shown
        assert "proxy (user, 9 d)" in shown
        renewed = client.put("/v1/cluster/update_cert", json=_proxy(365))
        assert renewed.status_code == 200, renewed.text
        wait_until(lambda: not _alert(client)["state"], timeout=60, what="the alert cleared")
    bodies = [b for b in receiver.wait_for(2) if b["alert"] == CLUSTER_ALERT]
    assert [b["state"] for b in bodies] == [True, False]
    assert bodies[0]["cluster"] == "cluster.local"
    assert bodies[0]["change_value"]["certificates"][0]["name"] == "proxy"
    assert receiver.received[0] == receiver.received[1]  # the 500, then the same raise again


# --- the rotation job --------------------------------------------------------------------------


class Pinger(threading.Thread):
    """Opens a new verifying TLS connection to a redis and PINGs, over and over, until
    stopped (bounded: at most ``limit`` connections). Every failure is kept."""

    def __init__(
        self, port: int, ca_file: str, client: tuple[Path, Path], limit: int = 20_000
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.ca_file, self.limit = port, ca_file, limit
        self.cert_file, self.key_file = client  # redis requires a client certificate
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            client = redis.Redis(
                host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.ca_file,
                ssl_cert_reqs="required", ssl_check_hostname=True, socket_timeout=10,
                ssl_certfile=str(self.cert_file), ssl_keyfile=str(self.key_file),
            )  # fmt: skip
            try:
                assert client.ping()
                self.ok += 1
            except (redis.RedisError, ssl.SSLError, OSError, AssertionError) as exc:
                self.failures.append(f"{time.strftime('%X')} {type(exc).__name__}: {exc}")
            finally:
                client.close()
            time.sleep(0.02)


def test_internal_certificates_are_renewed_before_expiry_without_a_failed_connection(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cluster = start_cluster(tmp_path_factory, 2, internal_validity=dt.timedelta(minutes=2))
    pingers = [
        Pinger(n.redis_port, str(cluster.cluster.ca_file), cluster.redis_client)
        for n in cluster.nodes
    ]
    try:
        with api(cluster) as client:
            first = client.get("/v1/cluster/certificates/proxy").json()
            for pinger in pingers:
                pinger.start()

            def renewal() -> dict[str, Any] | None:
                events = client.get("/v1/cluster/certificates/events").json()["events"]
                return next(
                    (e for e in events if e["who"] == "rotation-job" and e["name"] == "proxy"),
                    None,
                )

            def everywhere() -> dict[str, Any] | None:
                detail = client.get("/v1/cluster/certificates/proxy").json()
                in_sync = all(n["in_sync"] for n in detail["nodes"])
                return detail if in_sync and detail["generation"] > first["generation"] else None

            event = wait_until(renewal, timeout=150, interval=0.5, what="a renewal of proxy")
            detail = wait_until(everywhere, timeout=60, what="every node on the renewed proxy")
            time.sleep(1)  # a few more connections on the renewed certificate
    finally:
        for pinger in pingers:
            pinger.stop.set()
        for pinger in pingers:
            pinger.join(timeout=30)
        served = served_by_node(cluster)
        cluster.stop()
    assert event["old_fingerprint"] == first["fingerprint_sha256"]
    assert parse_iso(event["at"]) < parse_iso(first["not_after"])  # before expiry
    assert detail["fingerprint_sha256"] == event["new_fingerprint"]
    assert set(served.values()) == {event["new_fingerprint"]}
    for pinger in pingers:
        assert pinger.failures == [], pinger.failures
        assert pinger.ok >= 20


def _rollouts(client: httpx.Client, result: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "clustercert_rollouts_total" and sample.labels["result"] == result:
                return sample.value
    return 0.0


def test_a_node_down_delays_the_renewal_and_nothing_changes_until_it_is_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With node-2's agent stopped, the job's renewal cannot stage there: it is aborted (no
    node changes, the desired certificates stay) and retried after its backoff (30 s). Once
    node-2 is back, the retry renews on both nodes, before the old certificates expire."""
    cluster = start_cluster(tmp_path_factory, 2, internal_validity=dt.timedelta(minutes=3))
    try:
        down = cluster.nodes[1]
        assert down.process is not None
        down.process.terminate()
        down.process.wait(timeout=30)
        with api(cluster) as client:
            first = client.get("/v1/cluster/certificates/proxy").json()
            wait_until(
                lambda: _rollouts(client, "nodes_not_updated") >= 1, timeout=120, interval=0.5,
                what="a renewal refused while node-2 is down",
            )  # fmt: skip
            assert (
                client.get("/v1/cluster/certificates/proxy").json()["generation"]
                == (first["generation"])
            )
            cluster.start_agent(down)

            def renewed() -> dict[str, Any] | None:
                detail = client.get("/v1/cluster/certificates/proxy").json()
                in_sync = all(n["in_sync"] for n in detail["nodes"])
                return detail if in_sync and detail["generation"] > first["generation"] else None

            detail = wait_until(renewed, timeout=150, interval=0.5, what="the retried renewal")
        served = served_by_node(cluster)
    finally:
        cluster.stop()
    assert detail["updated_by"] == "rotation-job"
    assert parse_iso(detail["updated_at"]) < parse_iso(first["not_after"])
    assert set(served.values()) == {detail["fingerprint_sha256"]}
