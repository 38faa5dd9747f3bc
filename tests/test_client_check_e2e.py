"""Issue #11 end to end: "200 must mean every client accepts it". Certificates that pass every
structural rule but that TLS clients refuse are turned away by the API before anything is staged,
on the shared 3-node cluster (real control plane, agents and redis-server), and every node keeps
serving exactly what it served, proven by handshake."""

from __future__ import annotations

from pathlib import Path

import pytest
from certfactory import CA, openssl_ca_and_leaf
from clusterkit import api, served_by_node
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster

# Netscape cert type, SSL client only: no rule of ours reads it, OpenSSL's purpose check does.
NS_CLIENT_ONLY = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("2.16.840.1.113730.1.1"), b"\x03\x02\x07\x80"
)


def _proxy_fingerprint(cluster: DemoCluster) -> str:
    with api(cluster) as client:
        return str(client.get("/v1/cluster/certificates/proxy").json()["fingerprint_sha256"])


def _refused_and_nothing_changed(
    cluster: DemoCluster, body: dict[str, str], error_code: str
) -> str:
    """PUT ``body`` through update_cert, the batch and the dry run; return the description."""
    served, desired = served_by_node(cluster), _proxy_fingerprint(cluster)
    with api(cluster) as client:
        single = client.put("/v1/cluster/update_cert", json=body)
        batch = client.put("/v1/cluster/certificates", json={"certificates": [body]})
        dry = client.post("/v1/cluster/certificates/validate", json=body)
    for response in (single, batch, dry):
        assert response.status_code == 400, response.text
        assert response.json()["error_code"] == error_code
    assert batch.json()["errors"][0]["error_code"] == error_code
    assert served_by_node(cluster) == served
    assert _proxy_fingerprint(cluster) == desired
    return str(single.json()["description"])


def test_openssl_made_proxy_with_non_repudiation_only_is_refused(
    cluster: DemoCluster, tmp_path: Path
) -> None:
    """The reported case: an openssl-made RSA server certificate, keyUsage nonRepudiation."""
    pair = openssl_ca_and_leaf(
        tmp_path, key="rsa", eku="serverAuth", leaf_key_usage="critical,nonRepudiation"
    )
    body = {"name": "proxy", "certificate": pair.chain, "key": pair.leaf_key.read_text()}
    description = _refused_and_nothing_changed(cluster, body, "key_usage_mismatch")
    assert "keyUsage (nonRepudiation) lacks digitalSignature or keyEncipherment" in description
    assert "keyUsage = critical, digitalSignature, keyEncipherment" in description


def test_proxy_refused_by_the_handshake_alone(cluster: DemoCluster) -> None:
    """Passes every rule of ours; only the client's-eye handshake catches it."""
    leaf = CA.new().issue(
        "redis.example", sans=["redis.example"], eku=None, extensions=[(NS_CLIENT_ONLY, False)]
    )
    body = {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    description = _refused_and_nothing_changed(cluster, body, "rejected_by_tls_client")
    assert "refuses it: unsuitable certificate purpose" in description


def test_openssl_made_proxy_with_a_tls_key_usage_is_served_everywhere(
    cluster: DemoCluster, tmp_path: Path
) -> None:
    """The control: the same kind of certificate with a proper keyUsage gets 200, and every
    node serves it, so the new checks refuse only what clients refuse."""
    pair = openssl_ca_and_leaf(
        tmp_path,
        key="rsa",
        eku="serverAuth",
        leaf_key_usage="critical,digitalSignature,keyEncipherment",
    )
    body = {"name": "proxy", "certificate": pair.chain, "key": pair.leaf_key.read_text()}
    with api(cluster) as client:
        response = client.put("/v1/cluster/update_cert", json=body)
    assert response.status_code == 200, response.text
    leaf = x509.load_pem_x509_certificate(pair.leaf_cert.read_bytes())
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    assert set(served_by_node(cluster).values()) == {fingerprint}
