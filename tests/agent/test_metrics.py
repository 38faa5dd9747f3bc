"""The agent's own HTTPS listener (DESIGN §7): Prometheus metrics served with the
`metrics_exporter` certificate, swapped in place when it is replaced, mutual TLS only."""

from __future__ import annotations

import ssl

import httpx
import pytest
from clusterkit import api, served_fingerprint

from clustercert.demo import DemoCluster


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
