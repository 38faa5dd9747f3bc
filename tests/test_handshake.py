"""The client's-eye check (clustercert.handshake): real in-memory OpenSSL handshakes, and the
``rejected_by_tls_client`` step of validation that uses them. Times are pinned far from now on
purpose: the handshake must not depend on the real clock (docs/decisions.md)."""

from __future__ import annotations

import datetime as dt

import pytest
from certfactory import CA, Leaf, self_signed
from cryptography import x509

from clustercert import handshake, pki
from clustercert.errors import RejectedByTLSClient
from clustercert.validation import TrustStore, validate_upload

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)

# Netscape cert type (2.16.840.1.113730.1.1): a BIT STRING, bit 0 SSL client, bit 1 SSL server.
# Our rules ignore it; OpenSSL's purpose check does not, so only the handshake can catch it.
NS_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")
NS_CLIENT_ONLY = x509.UnrecognizedExtension(NS_CERT_TYPE, b"\x03\x02\x07\x80")
NS_SERVER_ONLY = x509.UnrecognizedExtension(NS_CERT_TYPE, b"\x03\x02\x06\x40")


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.new("Handshake Root", now=T0)


@pytest.fixture(scope="module")
def inter(root: CA) -> CA:
    return root.intermediate("Handshake Intermediate")


def _as_server(leaf: Leaf, anchor: x509.Certificate, host: str | None) -> handshake.Refusal | None:
    return handshake.refusal_as_server(
        leaf.chain_pem, leaf.key_pem, pki.certificates_to_pem([anchor]), host
    )


def _as_client(leaf: Leaf, anchor: x509.Certificate) -> handshake.Refusal | None:
    return handshake.refusal_as_client(
        leaf.chain_pem, leaf.key_pem, pki.certificates_to_pem([anchor])
    )


# --- the module --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec256", "p384", "rsa2048", "ed25519"])
def test_good_server_and_client_certificates_complete(root: CA, inter: CA, key_type: str) -> None:
    leaf = inter.issue("db.example", key_type=key_type)
    assert _as_server(leaf, root.cert, "db.example") is None
    assert _as_client(leaf, root.cert) is None


def test_time_is_not_checked(root: CA) -> None:
    """Validity is judged at the validation time by earlier rules; the handshake (at the real
    time) must not add a verdict of its own. 2030 is in the future, 2001 in the past."""
    future = root.issue("db.example")
    past_ca = CA.new("Past Root", now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    past = past_ca.issue("db.example", not_after=dt.datetime(2001, 6, 1, tzinfo=dt.UTC))
    assert _as_server(future, root.cert, "db.example") is None
    assert _as_server(past, past_ca.cert, "db.example") is None
    assert _as_client(past, past_ca.cert) is None


def test_wrong_purpose_is_refused_by_the_verifying_side(root: CA) -> None:
    client_only = root.issue("db.example", eku=["clientAuth"])
    refusal = _as_server(client_only, root.cert, "db.example")
    assert refusal == handshake.Refusal("client", "unsuitable certificate purpose")
    server_only = root.issue("db.example", eku=["serverAuth"])
    refusal = _as_client(server_only, root.cert)
    assert refusal == handshake.Refusal("server", "unsuitable certificate purpose")


def test_key_usage_without_a_tls_bit_is_refused(root: CA) -> None:
    """The certificate of issue #11, below our own rule: OpenSSL's verdict."""
    leaf = root.issue("db.example", key_usage=["nonRepudiation"], key_type="rsa2048")
    assert _as_server(leaf, root.cert, "db.example") == handshake.Refusal(
        "client", "unsuitable certificate purpose"
    )


def test_host_name_is_checked(root: CA) -> None:
    leaf = root.issue("db.example", sans=["db.example", "10.0.0.7"])
    assert _as_server(leaf, root.cert, "10.0.0.7") is None
    refusal = _as_server(leaf, root.cert, "other.example")
    assert refusal is not None and refusal.reason.startswith("Hostname mismatch")
    assert _as_server(leaf, root.cert, None) is None  # no name: purpose and chain only


def test_only_the_given_anchor_is_trusted(root: CA, inter: CA) -> None:
    leaf = inter.issue("db.example")
    assert _as_server(leaf, inter.cert, "db.example") is None  # an intermediate anchor
    stranger = CA.new("Stranger Root", now=T0)
    refusal = _as_server(leaf, stranger.cert, "db.example")
    assert refusal == handshake.Refusal("client", "unable to get local issuer certificate")
    refusal = _as_client(leaf, stranger.cert)
    assert refusal is not None and refusal.side == "server"


# --- validation's last step --------------------------------------------------------------------


def _validate(name: str, leaf: Leaf, trust: TrustStore | None = None) -> list[str]:
    trust = trust or TrustStore.of([leaf.issuers[-1]])
    return list(validate_upload(name, leaf.chain_pem, leaf.key_pem, at=T0, trust=trust).warnings)


def test_netscape_client_only_server_certificate_is_rejected(root: CA) -> None:
    leaf = root.issue("db.example", eku=None, extensions=[(NS_CLIENT_ONLY, False)])
    _validate("ldap_client", leaf)  # a client certificate may be client-only
    with pytest.raises(RejectedByTLSClient) as info:
        _validate("proxy", leaf)
    error = info.value
    assert (error.error_code, error.http_status) == ("rejected_by_tls_client", 400)
    assert error.description.startswith(
        "the certificate would not work for 'proxy' (client to database TLS (redis-server's TLS "
        "port)): in a TLS handshake, a TLS client connecting to 'db.example', trusting only "
        "'CN=Handshake Root,O=clustercert tests', refuses it: unsuitable certificate purpose; "
    )
    assert "extendedKeyUsage = serverAuth" in error.description


@pytest.mark.parametrize("name", ["ldap_client", "syncer", "data_internode_encryption"])
def test_netscape_server_only_client_certificate_is_rejected(root: CA, name: str) -> None:
    leaf = root.issue("db.example", eku=None, extensions=[(NS_SERVER_ONLY, False)])
    with pytest.raises(RejectedByTLSClient, match=r"a TLS server requiring client certificates"):
        _validate(name, leaf)


def test_wildcard_ip_and_missing_sans(root: CA) -> None:
    _validate("proxy", root.issue("wild", sans=["*.db.example"]))
    _validate("api", root.issue("ip", sans=["10.0.0.1", "db.example"]))
    warnings = _validate("cm", root.issue("no-san.example", sans=[]))
    assert any("no subjectAltName" in w for w in warnings)


def test_self_signed_leaf_is_its_own_anchor() -> None:
    leaf = self_signed("self.example", now=T0)
    validate_upload("proxy", leaf.cert_pem, leaf.key_pem, at=T0, trust=TrustStore.of([]))
    validate_upload("syncer", leaf.cert_pem, leaf.key_pem, at=T0, trust=TrustStore.of([]))


def test_keyless_and_non_tls_names_get_no_handshake(root: CA) -> None:
    """sso_service is SAML, not TLS; sso_issuer and mtls_trusted_ca have no key."""
    leaf = root.issue("saml.example", eku=None, extensions=[(NS_CLIENT_ONLY, False)])
    _validate("sso_service", leaf)
    validate_upload("sso_issuer", leaf.cert_pem, None, at=T0, trust=TrustStore.of([root.cert]))


def test_an_anchor_openssl_cannot_load_is_a_refusal_not_a_crash(root: CA) -> None:
    leaf = root.issue("db.example")
    broken = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"
    refusal = handshake.refusal_as_server(leaf.chain_pem, leaf.key_pem, broken, "db.example")
    assert refusal is not None and refusal.side == "client"
    assert refusal.reason.startswith("cannot load the trust anchor")
    refusal = handshake.refusal_as_client(leaf.chain_pem, leaf.key_pem, broken)
    assert refusal is not None and refusal.side == "server"
