"""PEM parsing and signature helpers of clustercert.pki (the untrusted-input boundary)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from certfactory import CA, cert_pem, key_pem, new_key, self_signed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from clustercert import pki
from clustercert.errors import EncryptedKey, InvalidCertificate

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("PKI Test Root", key_type="rsa2048", now=T0)


# --- read_pem_blocks ---------------------------------------------------------------------------


def test_blocks_ignore_surrounding_text_and_crlf(ca: CA) -> None:
    text = "Bag Attributes\r\n" + ca.cert_pem.replace("\n", "\r\n") + "trailer\r\n"
    [block] = pki.read_pem_blocks(text, field="certificate")
    assert block.label == "CERTIFICATE"
    assert block.position == 1
    assert block.der == ca.cert.public_bytes(serialization.Encoding.DER)
    assert "\r" not in block.text


def test_legacy_encryption_headers_are_read(ca: CA) -> None:
    encrypted = key_pem(new_key("ec256"), "legacy-encrypted")
    [block] = pki.read_pem_blocks(encrypted, field="key")
    assert dict(block.headers)["Proc-Type"] == "4,ENCRYPTED"
    assert block.encrypted


def test_block_budget_is_checked_before_parsing(ca: CA) -> None:
    pki.read_pem_blocks(ca.cert_pem * pki.MAX_PEM_BLOCKS, field="certificate")
    with pytest.raises(InvalidCertificate, match=r"holds 17 PEM blocks"):
        pki.read_pem_blocks(ca.cert_pem * (pki.MAX_PEM_BLOCKS + 1), field="certificate")


def test_truncated_and_empty_blocks() -> None:
    with pytest.raises(InvalidCertificate, match=r"PEM block 2 .* no '-----END X-----' line"):
        pki.read_pem_blocks(
            "-----BEGIN X-----\nAAAA\n-----END X-----\n-----BEGIN X-----\nAAAA\n", field="key"
        )
    with pytest.raises(InvalidCertificate, match=r"PEM block 1 .* is empty"):
        pki.read_pem_blocks("-----BEGIN X-----\n-----END X-----\n", field="key")


# --- describe_non_pem --------------------------------------------------------------------------


def test_describes_der_formats(ca: CA) -> None:
    der_cert = ca.cert.public_bytes(serialization.Encoding.DER)
    assert "openssl x509 -inform der" in pki.describe_non_pem(der_cert, field="certificate")
    der_key = ca.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "DER-encoded private key" in pki.describe_non_pem(der_key, field="key")
    encrypted = ca.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    assert "encrypted DER private key" in pki.describe_non_pem(encrypted, field="key")
    csr = x509.CertificateSigningRequestBuilder().subject_name(ca.cert.subject)
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    der_csr = csr.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert "(CSR)" in pki.describe_non_pem(der_csr, field="certificate")
    bundle = pkcs7.serialize_certificates([ca.cert], serialization.Encoding.DER)
    assert "openssl pkcs7 -inform der" in pki.describe_non_pem(bundle, field="certificate")
    assert "neither a certificate" in pki.describe_non_pem(b"\x30\x03\x02\x01\x05", field="key")


def test_describes_bare_base64_text_and_ssh(ca: CA) -> None:
    b64 = base64.b64encode(ca.cert.public_bytes(serialization.Encoding.DER))
    assert "base64 -d" in pki.describe_non_pem(b64, field="certificate")
    assert "SSH public key" in pki.describe_non_pem(b"ssh-ed25519 AAAA me@host", field="key")
    assert "no PEM block" in pki.describe_non_pem(b"hello", field="certificate")
    assert "empty" in pki.describe_non_pem(b"\n \n", field="key")
    assert "binary data (4 bytes)" in pki.describe_non_pem(b"\x00\x01\x02\x03", field="key")


# --- load_certificates / load_private_key ------------------------------------------------------


def test_load_certificates_keeps_upload_order(ca: CA) -> None:
    leaf = ca.issue()
    parsed = pki.load_certificates(cert_pem(ca.cert, leaf.cert))
    assert parsed.certificates == (ca.cert, leaf.cert)
    assert parsed.notes == ()


def test_parser_deprecation_warnings_become_notes(ca: CA) -> None:
    """pytest turns warnings into errors; the parser must catch cryptography's on purpose."""
    parsed = pki.load_certificates(ca.issue(serial=-3).cert_pem)
    assert len(parsed.notes) == 1
    assert "not strictly conforming" in parsed.notes[0]


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_load_private_key_formats(ca: CA, fmt: str) -> None:
    key = pki.load_private_key(key_pem(ca.key, fmt))  # type: ignore[arg-type]
    assert pki.spki_sha256(key.public_key()) == pki.spki_sha256(ca.key.public_key())


def test_load_private_key_refuses_encryption_without_leaking() -> None:
    text = key_pem(new_key("rsa2048"), "encrypted")
    with pytest.raises(EncryptedKey, match="ENCRYPTED PRIVATE KEY") as info:
        pki.load_private_key(text)
    assert text.splitlines()[1] not in info.value.description


# --- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "digest"),
    [
        ("rsa2048", "sha256"),
        ("rsa2048", "sha1"),
        ("rsa2048", "md5"),
        ("ec256", "sha384"),
        ("ec256", "sha1"),
        ("dsa2048", "sha1"),
        ("ed25519", "sha256"),
        ("ed448", "sha256"),
    ],
)
def test_signature_verifies_for_legacy_and_modern_algorithms(key_type: str, digest: str) -> None:
    issuer = CA.new(key_type=key_type, now=T0)
    leaf = issuer.issue(signature_hash=digest)  # type: ignore[arg-type]
    assert pki.signature_verifies(leaf.cert, issuer.cert.public_key())
    assert pki.is_issued_by(leaf.cert, issuer.cert)
    assert not pki.signature_verifies(leaf.cert, new_key(key_type, fresh=True).public_key())
    assert not pki.is_self_signed(leaf.cert)


def test_signature_needs_a_key_of_the_right_type(ca: CA) -> None:
    leaf = ca.issue()
    assert not pki.signature_verifies(
        leaf.cert, ec.generate_private_key(ec.SECP256R1()).public_key()
    )


def test_self_signed_and_names(ca: CA) -> None:
    assert pki.is_self_signed(ca.cert)
    selfie = self_signed("me.example", sans=["me.example", "::1", "email:a@b.example"], now=T0)
    assert pki.is_self_signed(selfie.cert)
    assert pki.subject_alt_names(selfie.cert) == ["me.example", "::1", "email:a@b.example"]
    assert pki.san_count(selfie.cert) == 3
    assert pki.describe_name(x509.Name([])) == "(empty name)"
    assert pki.signature_algorithm_name(ca.issue(signature_hash="sha1").cert) == (
        "sha1WithRSAEncryption"
    )
