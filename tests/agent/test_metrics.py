"""The agent's own HTTPS listener (DESIGN §7): Prometheus metrics served with the
`metrics_exporter` certificate, swapped in place when it is replaced, mutual TLS only."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import pytest
from clusterkit import api, served_fingerprint
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from clustercert import pki
from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster


def _scraper(cluster: DemoCluster) -> httpx.Client:
    """A client holding an internal-CA clientAuth certificate (the control plane's own)."""
    directory = cluster.cluster
    context = ssl.create_default_context(cafile=str(directory.ca_file))
    context.load_cert_chain(directory.identity_cert, directory.identity_key)
    return httpx.Client(verify=context, timeout=30)


def test_metrics_listener_swaps_its_certificate_without_dropping_connections(
    cluster: DemoCluster,
) -> None:
    node = cluster.nodes[0]
    assert node.metrics_port is not None
    url = f"https://127.0.0.1:{node.metrics_port}/metrics"
    with _scraper(cluster) as scraper:
        first = scraper.get(url)
        assert first.status_code == 200
        assert 'clustercert_node_certificate_generation{name="proxy"}' in first.text
        before = served_fingerprint("127.0.0.1", node.metrics_port)
        with api(cluster) as client:
            response = client.post(
                "/v1/cluster/certificates/rotate", json={"name": "metrics_exporter"}
            )
        assert response.status_code == 200, response.text
        rotated = response.json()["certificates"][0]["fingerprint_sha256"]
        # The connection opened before the swap keeps working.
        assert scraper.get(url).status_code == 200
    assert rotated != before
    for each in cluster.nodes:
        assert each.metrics_port is not None
        assert served_fingerprint("127.0.0.1", each.metrics_port) == rotated
        assert served_fingerprint("127.0.0.1", each.metrics_port, "localhost") == rotated


def test_metrics_listener_refuses_clients_without_a_cluster_certificate(
    cluster: DemoCluster,
) -> None:
    node = cluster.nodes[0]
    context = ssl.create_default_context(cafile=str(cluster.cluster.ca_file))
    with (
        httpx.Client(verify=context, timeout=30) as anonymous,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        anonymous.get(f"https://127.0.0.1:{node.metrics_port}/metrics")


def _series(text: str, metric: str) -> dict[str, tuple[dict[str, str], float]]:
    """``metric``'s samples by logical_name: (labels, value)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric:
                found[sample.labels["logical_name"]] = (sample.labels, sample.value)
    return found


def test_node_cert_expiration_seconds_has_redis_enterprise_labels(cluster: DemoCluster) -> None:
    """One series per certificate the node serves (the file its services use), plus its
    internode identity and trusted CA: seconds left, as Redis Enterprise exports them."""
    node = cluster.nodes[0]
    with _scraper(cluster) as scraper, api(cluster) as client:
        before = time.time()
        text = scraper.get(f"https://127.0.0.1:{node.metrics_port}/metrics").text
        after = time.time()
        nodes = {n["name"]: n for n in client.get("/v1/nodes").json()}
        certificates = {
            name: client.get(f"/v1/cluster/certificates/{name}").json()
            for name in ("proxy", "metrics_exporter")
        }
    series = _series(text, "node_cert_expiration_seconds")
    assert {"proxy", "syncer", "metrics_exporter", "node_identity", "internal_ca"} <= set(series)
    for name, (labels, seconds) in series.items():
        assert labels["cluster"] == "cluster.local", labels
        assert labels["node"] == str(nodes[node.name]["uid"])
        path = Path(labels["path"])
        assert path.is_file() and path.is_relative_to(node.directory)
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        # Seconds left at scrape time, which lies between before and after.
        expiry = leaf.not_valid_after_utc.timestamp()
        assert expiry - after <= seconds <= expiry - before, name
    for name, detail in certificates.items():
        labels, seconds = series[name]
        served = x509.load_pem_x509_certificates(Path(labels["path"]).read_bytes())[0]
        assert pki.fingerprint_sha256(served) == detail["fingerprint_sha256"]
        assert f"/{detail['generation']}/" in labels["path"]
