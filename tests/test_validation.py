"""Upload validation (DESIGN §5) with real certificates; the validation time is always pinned."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from certfactory import (
    CA,
    Leaf,
    cert_pem,
    key_pem,
    new_key,
    openssl,
    openssl_ca_and_leaf,
    self_signed,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ObjectIdentifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercert import pki
from clustercert.errors import (
    CertificateExpired,
    CertificateRejected,
    ChainInvalid,
    ClusterCertError,
    EncryptedKey,
    InsecureSignature,
    InvalidCertificate,
    InvalidSchema,
    IssuerKeyUsage,
    IssuerNotFound,
    KeyUsageMismatch,
    KeyValuesMismatch,
    LeafIsCA,
    MissingExtendedKeyUsage,
    MissingKey,
    NotACA,
    NotYetValid,
    RejectedByTLSClient,
    UnexpectedKey,
    UnknownCertificate,
    WeakKey,
)
from clustercert.names import NAMES
from clustercert.validation import (
    CLOCK_SKEW,
    EXPIRY_WARNING,
    MAX_CHAIN_LENGTH,
    MAX_NAME_ATTRIBUTES,
    MAX_SANS,
    BatchIssuerNotFound,
    TrustStore,
    UploadItem,
    ValidatedCertificate,
    validate_all,
    validate_upload,
)

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
NO_TRUST = TrustStore.of([])


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.new("Test Root", now=T0)


@pytest.fixture(scope="module")
def inter(root: CA) -> CA:
    return root.intermediate("Test Intermediate")


@pytest.fixture(scope="module")
def leaf(inter: CA) -> Leaf:
    return inter.issue("db.example", sans=["db.example", "10.0.0.1"])


@pytest.fixture(scope="module")
def trust(root: CA) -> TrustStore:
    return TrustStore.of([root.cert])


def check(
    leaf: Leaf,
    trust: TrustStore,
    *,
    name: str = "proxy",
    certificate: str | None = None,
    key: str | None = "leaf",
    at: dt.datetime = T0,
) -> ValidatedCertificate:
    """validate_upload with the usual upload of ``leaf`` (chain without root, PKCS#8 key)."""
    return validate_upload(
        name,
        leaf.chain_pem if certificate is None else certificate,
        leaf.key_pem if key == "leaf" else key,
        at=at,
        trust=trust,
    )


# --- accepted uploads --------------------------------------------------------------------------


def test_accepts_leaf_and_intermediate_and_normalises(
    leaf: Leaf, inter: CA, trust: TrustStore
) -> None:
    result = check(leaf, trust)
    assert result.name == "proxy"
    assert result.chain == (leaf.cert, inter.cert)
    assert result.chain_pem == cert_pem(leaf.cert, inter.cert)
    assert result.fingerprint_sha256 == leaf.fingerprint
    assert result.not_before == leaf.cert.not_valid_before_utc
    assert result.not_after == leaf.cert.not_valid_after_utc
    assert result.warnings == ()
    assert result.key_pem is not None
    assert result.key_pem.startswith("-----BEGIN PRIVATE KEY-----")


def test_summary(leaf: Leaf, trust: TrustStore) -> None:
    summary = check(leaf, trust).summary()
    assert summary == {
        "subject": "CN=db.example",
        "issuer": "CN=Test Intermediate,O=clustercert tests",
        "sans": ["db.example", "10.0.0.1"],
        "not_before": "2029-12-31T12:00:00Z",
        "not_after": "2031-01-01T12:00:00Z",
        "fingerprint_sha256": leaf.fingerprint,
        "key_type": "EC-P256",
        "key_bits": 256,
        "chain_length": 2,
    }


@pytest.mark.parametrize(
    ("key_type", "formats", "described"),
    [
        ("rsa2048", ["pkcs8", "pkcs1"], "RSA-2048"),
        ("rsa4096", ["pkcs8", "pkcs1"], "RSA-4096"),
        ("ec256", ["pkcs8", "sec1"], "EC-P256"),
        ("p384", ["pkcs8", "sec1"], "EC-P384"),
        ("p521", ["pkcs8", "sec1"], "EC-P521"),
        ("ed25519", ["pkcs8"], "Ed25519"),
        ("ed448", ["pkcs8"], "Ed448"),
    ],
)
def test_accepts_key_types_and_formats(
    inter: CA, trust: TrustStore, key_type: str, formats: list[str], described: str
) -> None:
    leaf = inter.issue(key_type=key_type)
    for fmt in formats:
        result = check(leaf, trust, key=leaf.key_pem_as(fmt))  # type: ignore[arg-type]
        assert result.summary()["key_type"] == described
        # Whatever came in, the stored key is unencrypted PKCS#8 of the same key.
        assert result.key_pem is not None
        reloaded = serialization.load_pem_private_key(result.key_pem.encode(), None)
        assert pki.spki_sha256(reloaded.public_key()) == pki.spki_sha256(leaf.key.public_key())


@pytest.mark.parametrize("key_type", ["rsa2048", "p384", "ed25519", "ed448"])
def test_accepts_chains_signed_by_every_key_type(key_type: str) -> None:
    root = CA.new(key_type=key_type, now=T0)
    leaf = root.intermediate("I", key_type=key_type).issue()
    result = check(leaf, TrustStore.of([root.cert]))
    assert result.chain[0] == leaf.cert


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_any_upload_order_is_normalised(
    root: CA, inter: CA, leaf: Leaf, order: tuple[int, ...]
) -> None:
    certs = [leaf.cert, inter.cert, root.cert]
    upload = cert_pem(*(certs[i] for i in order))
    result = check(leaf, NO_TRUST, certificate=upload)
    assert result.chain == tuple(certs)  # leaf first; an uploaded root stays in
    assert result.chain_pem == cert_pem(*certs)


def test_uploaded_self_signed_root_completes_the_chain(leaf: Leaf) -> None:
    """DESIGN §5: the root may be uploaded instead of trusted."""
    assert len(check(leaf, NO_TRUST, certificate=leaf.full_chain_pem).chain) == 3


def test_leaf_issued_by_a_trusted_root_alone(root: CA, trust: TrustStore) -> None:
    leaf = root.issue()
    assert check(leaf, trust, certificate=leaf.cert_pem).chain == (leaf.cert,)


def test_trust_store_may_hold_an_intermediate(leaf: Leaf, inter: CA) -> None:
    result = check(leaf, TrustStore.of([inter.cert]), certificate=leaf.cert_pem)
    assert result.chain == (leaf.cert,)


def test_text_around_pem_crlf_and_duplicates(leaf: Leaf, inter: CA, trust: TrustStore) -> None:
    messy = (
        "subject=CN = db.example\r\nissuer=whatever\r\n"
        + leaf.chain_pem.replace("\n", "\r\n")
        + "Bag Attributes: trailing junk\n"
        + inter.cert_pem
    )
    key = "openssl genpkey output follows\n" + leaf.key_pem.replace("\n", "\r\n") + "bye\n"
    result = check(leaf, trust, certificate=messy, key=key)
    assert result.chain == (leaf.cert, inter.cert)
    assert any("uploaded twice" in w for w in result.warnings)


def test_openssl_text_output_around_the_pem_is_accepted(tmp_path: Path) -> None:
    """What `openssl x509 -text` writes (a dump, then the PEM block) stays accepted."""
    pair = openssl_ca_and_leaf(tmp_path)
    openssl("x509", "-in", "leaf.pem", "-text", "-out", "leaf-text.pem", cwd=tmp_path)
    openssl("x509", "-in", "ca.pem", "-text", "-out", "ca-text.pem", cwd=tmp_path)
    text = (tmp_path / "leaf-text.pem").read_text() + (tmp_path / "ca-text.pem").read_text()
    assert "Certificate:" in text and "Signature Algorithm" in text
    ca = x509.load_pem_x509_certificate(pair.ca_cert.read_bytes())
    result = validate_upload(
        "proxy", text, pair.leaf_key.read_text(), at=ca.not_valid_before_utc, trust=NO_TRUST
    )
    assert len(result.chain) == 2


@pytest.mark.parametrize(
    ("tail", "what"),
    [
        ("\x00", r"byte 0x00 \(NUL\)"),
        ("garbage\x00\x01", r"byte 0x00 \(NUL\)"),
        ("\udcff\udcfe", r"byte 0xFF, which is not UTF-8 text,"),  # the CLI's surrogateescape
        ("\ufffd", r"U\+FFFD"),  # what jq --rawfile or errors="replace" leave for 0xFF
        ("\x1b[0m", r"byte 0x1B"),
        ("\x85", r"the non-text character U\+0085"),
    ],
    ids=["nul", "nul-after-text", "0xff-from-cli", "replacement-char", "escape", "c1-control"],
)
def test_binary_bytes_after_the_end_line(
    leaf: Leaf, trust: TrustStore, tail: str, what: str
) -> None:
    certificate = leaf.chain_pem + tail
    offset = len(leaf.chain_pem) + (len("garbage") if tail.startswith("garbage") else 0)
    with pytest.raises(InvalidCertificate, match=what) as info:
        check(leaf, trust, certificate=certificate)
    assert (info.value.error_code, info.value.http_status) == ("invalid_certificate", 400)
    assert f"at byte offset {offset}, after the END line of PEM block 2" in info.value.description


def test_binary_bytes_before_the_first_block_and_in_the_key(leaf: Leaf, trust: TrustStore) -> None:
    with pytest.raises(InvalidCertificate, match=r"0x00 \(NUL\) at byte offset 3, before the"):
        check(leaf, trust, certificate="abc\x00" + leaf.chain_pem)
    with pytest.raises(InvalidCertificate, match=r"the key field holds binary data") as info:
        check(leaf, trust, key=leaf.key_pem + "\x00\x00")
    assert "PRIVATE KEY" not in info.value.description.replace("PEM blocks", "")


def test_text_whitespace_around_pem_is_not_binary(leaf: Leaf, trust: TrustStore) -> None:
    """Tabs, form feeds and vertical tabs are whitespace; accented letters are text."""
    check(leaf, trust, certificate="\tJürgen's chain\f\v\n" + leaf.chain_pem + "\t\n\f")


def test_ec_parameters_block_before_the_key_is_ignored(leaf: Leaf, trust: TrustStore) -> None:
    params = "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    assert check(leaf, trust, key=params + leaf.key_pem_as("sec1")).chain[0] == leaf.cert


def test_self_signed_leaf_is_its_own_root() -> None:
    selfie = self_signed("self.example", now=T0)
    result = check(selfie, NO_TRUST, certificate=selfie.cert_pem)
    assert result.chain == (selfie.cert,)
    assert any("self-signed" in w for w in result.warnings)


def test_thousands_of_sans_are_accepted(inter: CA, trust: TrustStore) -> None:
    some = inter.issue("some.example", sans=[f"h{i}.some.example" for i in range(2_000)])
    assert len(check(some, trust).summary()["sans"]) == 2_000  # type: ignore[arg-type]
    many = inter.issue("many.example", sans=[f"h{i}.many.example" for i in range(10_000)])
    result = check(many, trust, name="sso_service")  # no TLS peer: no handshake size limit
    assert len(result.summary()["sans"]) == 10_000  # type: ignore[arg-type]


def test_certificates_too_big_for_openssl_peers(inter: CA, trust: TrustStore) -> None:
    """10,000 SANs make a ~200 KiB certificate; OpenSSL peers take 100 KiB by default."""
    many = inter.issue("many.example", sans=[f"h{i}.many.example" for i in range(10_000)])
    with pytest.raises(RejectedByTLSClient, match=r"EXCESSIVE_MESSAGE_SIZE.* at most 100 KiB"):
        check(many, trust)


def test_expiring_within_30_days_is_a_warning(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(not_after=T0 + EXPIRY_WARNING)
    warned = check(leaf, trust)
    assert any(re.search(r"the leaf .* expires in 30 days", w) for w in warned.warnings)
    quiet = check(inter.issue(not_after=T0 + EXPIRY_WARNING + SECOND), trust)
    assert not any("expires" in w for w in quiet.warnings)


def test_server_leaf_without_san_is_a_warning(inter: CA, trust: TrustStore) -> None:
    result = check(inter.issue("no-san.example", sans=[]), trust)
    assert any("no subjectAltName" in w for w in result.warnings)


def test_non_conforming_serial_becomes_a_warning(inter: CA, trust: TrustStore) -> None:
    result = check(inter.issue(serial=0), trust)
    assert any("serial number" in w for w in result.warnings)


def test_naive_validation_time_is_a_programming_error(leaf: Leaf, trust: TrustStore) -> None:
    with pytest.raises(ValueError, match=r"timezone-aware"):
        check(leaf, trust, at=T0.replace(tzinfo=None))


# --- names -------------------------------------------------------------------------------------


def test_unknown_name(leaf: Leaf, trust: TrustStore) -> None:
    with pytest.raises(UnknownCertificate, match=r"unknown certificate name 'nope'") as info:
        check(leaf, trust, name="nope")
    assert info.value.error_code == "unknown_certificate"
    assert info.value.http_status == 403


def test_missing_key(leaf: Leaf, trust: TrustStore) -> None:
    for key in (None, "", "  \n"):
        with pytest.raises(MissingKey, match=r"'proxy' .* needs the private key") as info:
            check(leaf, trust, key=key)
        assert info.value.error_code == "missing_key"


@pytest.mark.parametrize("name", ["mtls_trusted_ca", "sso_issuer"])
def test_unexpected_key(root: CA, name: str, trust: TrustStore) -> None:
    with pytest.raises(UnexpectedKey, match=f"'{name}' .* takes no private key") as info:
        validate_upload(name, root.cert_pem, root.key_pem, at=T0, trust=trust)
    assert info.value.error_code == "unexpected_key"


def test_keyless_names_accept_an_empty_key(root: CA, trust: TrustStore) -> None:
    result = validate_upload("mtls_trusted_ca", root.cert_pem, "", at=T0, trust=trust)
    assert result.key_pem is None


def test_sso_issuer_may_be_a_self_signed_ca(root: CA) -> None:
    result = validate_upload("sso_issuer", root.cert_pem, None, at=T0, trust=NO_TRUST)
    assert result.chain == (root.cert,)


def test_sso_service_has_no_eku_requirement(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(eku=["codeSigning"])
    assert check(leaf, trust, name="sso_service").chain[0] == leaf.cert


# --- parse -------------------------------------------------------------------------------------


def _der(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.DER).decode("latin-1")


@pytest.mark.parametrize(
    ("upload", "pattern"),
    [
        (lambda leaf: "", r"the certificate is empty"),
        (lambda leaf: " \n\t\n", r"the certificate is empty"),
        (lambda leaf: "\x00\x01\x02\xff garbage \x7f", r"binary data \(\d+ bytes\)"),
        (lambda leaf: "just some text", r"no PEM block"),
        (lambda leaf: _der(leaf.cert), r"DER-encoded certificate.*openssl x509 -inform der"),
        (
            lambda leaf: leaf.pkcs12(b"secret").decode("latin-1"),
            r"PKCS#12.*openssl pkcs12 -in .* -nokeys",
        ),
        (
            lambda leaf: leaf.pkcs12().decode("utf-8", "surrogateescape"),
            r"PKCS#12.*-nocerts -nodes",
        ),
        (
            lambda leaf: "\n".join(leaf.cert_pem.splitlines()[1:-1]),
            r"DER-encoded certificate in bare base64.*base64 -d",
        ),
        (lambda leaf: leaf.key_pem, r"PEM block 1 of the certificate is a PRIVATE KEY.*key field"),
        (
            lambda leaf: leaf.chain_pem + leaf.key_pem_as("pkcs1"),
            r"PEM block 3 .* PRIVATE KEY",
        ),
        (lambda leaf: leaf.chain_pem[:200], r"no '-----END CERTIFICATE-----' line.*truncated"),
        (
            lambda leaf: leaf.cert_pem.replace("M", "!", 3),
            r"PEM block 1 .* not valid base64",
        ),
        (
            lambda leaf: "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
            r"not a well-formed X\.509 certificate",
        ),
        (
            lambda leaf: (
                "-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n"
            ),
            r"a CSR is not a certificate",
        ),
        (
            lambda leaf: "-----BEGIN PKCS7-----\nMAA=\n-----END PKCS7-----\n",
            r"openssl pkcs7 .* -print_certs",
        ),
        (
            lambda leaf: (
                "-----BEGIN TRUSTED CERTIFICATE-----\nMAA=\n-----END TRUSTED CERTIFICATE-----\n"
            ),
            r"OpenSSL's trust format",
        ),
    ],
    ids=[
        "empty",
        "whitespace",
        "binary-garbage",
        "text",
        "der",
        "pkcs12-encrypted",
        "pkcs12-plain",
        "bare-base64",
        "key-in-cert-field",
        "key-after-chain",
        "truncated",
        "corrupt-base64",
        "not-a-certificate",
        "csr",
        "pkcs7",
        "trusted-certificate",
    ],
)
def test_invalid_certificate_field(
    leaf: Leaf, trust: TrustStore, upload: Callable[[Leaf], str], pattern: str
) -> None:
    with pytest.raises(InvalidCertificate, match=pattern) as info:
        check(leaf, trust, certificate=upload(leaf))
    assert info.value.error_code == "invalid_certificate"
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        (lambda leaf: leaf.cert_pem, r"PEM block 1 of the key is a CERTIFICATE"),
        (lambda leaf: leaf.key_pem + key_pem(new_key()), r"the key field holds 2 private keys"),
        (lambda leaf: leaf.key_pem_as("der"), r"DER-encoded private key.*openssl pkey -inform der"),
        (lambda leaf: leaf.key_pem[:100], r"no '-----END PRIVATE KEY-----' line"),
        (lambda leaf: "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n"
         "-----END EC PARAMETERS-----\n", r"holds no private key"),
        (
            lambda leaf: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n"
            "-----END OPENSSH PRIVATE KEY-----\n",
            r"OpenSSH's format.*ssh-keygen -p -m PKCS8",
        ),
        (
            lambda leaf: "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n",
            r"could not be read",
        ),
    ],
    ids=["cert-in-key-field", "two-keys", "der-key", "truncated", "only-params", "openssh",
         "damaged"],
)  # fmt: skip
def test_invalid_key_field(
    leaf: Leaf, trust: TrustStore, key: Callable[[Leaf], str], pattern: str
) -> None:
    with pytest.raises(InvalidCertificate, match=pattern):
        check(leaf, trust, key=key(leaf))


def test_der_certificate_ending_in_a_whitespace_byte(inter: CA, trust: TrustStore) -> None:
    """About 1 DER certificate in 40 ends in a byte such as 0x0A; it is still DER, not text."""
    for _ in range(2_000):  # bounded: each try has a ~2.3 % chance
        leaf = inter.issue()
        der = leaf.cert.public_bytes(serialization.Encoding.DER)
        if der[-1:].isspace():
            break
    else:
        pytest.fail("no DER certificate ending in a whitespace byte in 2,000 tries")
    with pytest.raises(InvalidCertificate, match=r"is a DER-encoded certificate, not PEM"):
        check(leaf, trust, certificate=der.decode("utf-8", "surrogateescape"))


def test_openssl_made_pkcs12_and_der(tmp_path: Path, trust: TrustStore) -> None:
    pair = openssl_ca_and_leaf(tmp_path)
    openssl("x509", "-in", "leaf.pem", "-outform", "der", "-out", "leaf.der", cwd=tmp_path)
    openssl(
        "pkcs12", "-export", "-in", "leaf.pem", "-inkey", "leaf.key", "-out", "leaf.p12",
        "-passout", "pass:secret", cwd=tmp_path,
    )  # fmt: skip
    key = pair.leaf_key.read_text()
    for name, pattern in (("leaf.der", "DER-encoded certificate"), ("leaf.p12", "PKCS#12")):
        data = (tmp_path / name).read_bytes().decode("utf-8", "surrogateescape")
        with pytest.raises(InvalidCertificate, match=pattern):
            validate_upload("proxy", data, key, at=T0, trust=trust)


@pytest.mark.parametrize("fmt", ["encrypted", "legacy-encrypted"])
@pytest.mark.parametrize("key_type", ["rsa2048", "ec256"])
def test_encrypted_key(inter: CA, trust: TrustStore, fmt: str, key_type: str) -> None:
    leaf = inter.issue(key_type=key_type)
    with pytest.raises(
        EncryptedKey, match=r"encrypted.*openssl pkey -in key\.pem -out key-decrypted\.pem"
    ) as info:
        check(leaf, trust, key=leaf.key_pem_as(fmt))  # type: ignore[arg-type]
    assert info.value.error_code == "encrypted_key"


@pytest.mark.parametrize(
    ("key_type", "pattern"),
    [
        ("rsa1024", r"private key is RSA-1024, which is too weak"),
        ("dsa2048", r"private key is DSA-2048; DSA is not accepted"),
        ("secp256k1", r"elliptic curve secp256k1, which is not accepted"),
    ],
)
def test_weak_key(inter: CA, trust: TrustStore, key_type: str, pattern: str) -> None:
    leaf = inter.issue(key_type=key_type)
    with pytest.raises(WeakKey, match=pattern) as info:
        check(leaf, trust)
    assert info.value.error_code == "weak_key"
    assert "openssl genpkey" in info.value.description


def test_rsa_modulus_must_be_whole_bytes(inter: CA, trust: TrustStore) -> None:
    key = rsa.generate_private_key(65537, 2052)
    leaf = inter.issue(key=key)
    with pytest.raises(WeakKey, match=r"RSA-2052, not a whole number of bytes"):
        check(leaf, trust)


def test_weak_key_in_an_intermediate(root: CA, trust: TrustStore) -> None:
    leaf = root.intermediate("Weak Intermediate", key_type="rsa1024").issue()
    with pytest.raises(WeakKey, match=r"public key of certificate 'CN=Weak Intermediate"):
        check(leaf, trust)


def test_weak_key_of_a_keyless_leaf(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(key_type="rsa1024", is_ca=True)
    with pytest.raises(WeakKey, match=r"public key of the leaf"):
        check(leaf, trust, name="sso_issuer", key=None)


def test_budget_pem_blocks(leaf: Leaf, trust: TrustStore) -> None:
    with pytest.raises(InvalidCertificate, match=r"holds 17 PEM blocks; at most 16"):
        check(leaf, trust, certificate=leaf.cert_pem * 17)


def test_budget_input_size(leaf: Leaf, trust: TrustStore) -> None:
    huge = leaf.chain_pem + "#" * (1 << 20)
    with pytest.raises(InvalidCertificate, match=r"at most 1048576 bytes \(1 MiB\)"):
        check(leaf, trust, certificate=huge)


def test_budget_chain_length(root: CA) -> None:
    ca = root
    for depth in range(MAX_CHAIN_LENGTH):
        ca = ca.intermediate(f"Level {depth}")
    leaf = ca.issue()
    with pytest.raises(InvalidCertificate, match=f"a chain has at most {MAX_CHAIN_LENGTH}"):
        check(leaf, NO_TRUST, certificate=leaf.full_chain_pem)


def test_budget_sans(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue("x.example", sans=[f"h{i}.x.example" for i in range(MAX_SANS + 1)])
    with pytest.raises(InvalidCertificate, match=f"{MAX_SANS + 1} subjectAltNames; at most"):
        check(leaf, trust)


def test_budget_name_attributes(inter: CA, trust: TrustStore) -> None:
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"n{i}") for i in range(100)])
        )
        .issuer_name(inter.cert.subject)
        .public_key(new_key().public_key())
        .serial_number(1)
        .not_valid_before(T0 - dt.timedelta(days=1))
        .not_valid_after(T0 + dt.timedelta(days=1))
    )
    assert isinstance(inter.key, ec.EllipticCurvePrivateKey)
    cert = builder.sign(inter.key, hashes.SHA256())
    with pytest.raises(InvalidCertificate, match=f"100 attributes; at most {MAX_NAME_ATTRIBUTES}"):
        validate_upload("sso_issuer", cert_pem(cert), None, at=T0, trust=trust)


# --- key match ---------------------------------------------------------------------------------


def test_key_values_mismatch_names_both_keys_and_no_key_material(
    leaf: Leaf, trust: TrustStore
) -> None:
    other = rsa.generate_private_key(65537, 2048)
    other_pem = key_pem(other)
    with pytest.raises(KeyValuesMismatch, match=r"does not match the certificate") as info:
        check(leaf, trust, key=other_pem)
    assert info.value.error_code == "key_values_mismatch"
    text = info.value.description
    assert f"certificate key: EC-P256 {pki.spki_sha256(leaf.key.public_key())}" in text
    assert f"uploaded key: RSA-2048 {pki.spki_sha256(other.public_key())}" in text
    body = "".join(other_pem.splitlines()[1:-1])
    assert not any(body[i : i + 16] in text for i in range(0, len(body) - 16, 16))
    assert "PRIVATE" not in text


def test_key_of_the_intermediate_is_named(leaf: Leaf, inter: CA, trust: TrustStore) -> None:
    with pytest.raises(KeyValuesMismatch, match=r"belongs to 'CN=Test Intermediate"):
        check(leaf, trust, key=inter.key_pem)


def test_key_picks_the_leaf_among_unrelated_candidates(leaf: Leaf, trust: TrustStore) -> None:
    """An unrelated certificate uploaded first must not be taken for the leaf."""
    stranger = CA.new("Stranger", now=T0).issue("stranger.example")
    with pytest.raises(ChainInvalid, match=r"'CN=stranger.example' is not part of the chain"):
        check(leaf, trust, certificate=stranger.cert_pem + leaf.chain_pem)


# --- validity ----------------------------------------------------------------------------------


def test_not_after_boundary(leaf: Leaf, trust: TrustStore) -> None:
    not_after = leaf.cert.not_valid_after_utc
    check(leaf, trust, at=not_after)
    check(leaf, trust, at=not_after + dt.timedelta(milliseconds=999))  # whole seconds
    with pytest.raises(CertificateExpired, match=r"the leaf 'CN=db\.example' expired on") as info:
        check(leaf, trust, at=not_after + SECOND)
    assert info.value.http_status == 406
    assert info.value.error_code == "certificate_expired"


def test_not_before_boundary_with_clock_skew(leaf: Leaf, trust: TrustStore) -> None:
    not_before = leaf.cert.not_valid_before_utc
    check(leaf, trust, at=not_before - CLOCK_SKEW)
    with pytest.raises(NotYetValid, match=r"not valid before .*5 minutes of clock skew") as info:
        check(leaf, trust, at=not_before - CLOCK_SKEW - SECOND)
    assert info.value.http_status == 400
    assert info.value.error_code == "not_yet_valid"


def test_not_before_within_the_skew_is_accepted_with_when_clients_accept_it(
    inter: CA, trust: TrustStore
) -> None:
    soon = inter.issue(not_before=T0 + dt.timedelta(minutes=4))
    warned = check(soon, trust)
    assert any(
        "the leaf 'CN=leaf.example' is not valid before 2030-01-01 12:04:00 UTC, 240 s after" in w
        and "TLS clients will start accepting it at 2030-01-01 12:04:00 UTC" in w
        for w in warned.warnings
    ), warned.warnings
    quiet = check(inter.issue(not_before=T0), trust)
    assert not any("start accepting" in w for w in quiet.warnings)


def test_not_before_warning_names_the_latest_chain_certificate(root: CA, trust: TrustStore) -> None:
    late = root.intermediate("Late Intermediate", not_before=T0 + dt.timedelta(seconds=90))
    warned = check(late.issue(not_before=T0 + SECOND), trust)
    assert any(
        "certificate 'CN=Late Intermediate" in w and "accepting it at 2030-01-01 12:01:30 UTC" in w
        for w in warned.warnings
    ), warned.warnings


def test_expired_intermediate(root: CA, trust: TrustStore) -> None:
    inter = root.intermediate("Old Intermediate", not_after=T0 - SECOND)
    leaf = inter.issue()
    with pytest.raises(CertificateExpired, match=r"certificate 'CN=Old Intermediate.*expired"):
        check(leaf, trust)


def test_expired_uploaded_root(leaf: Leaf) -> None:
    old = CA.new("Old Root", now=T0, not_after=T0 - SECOND)
    leaf = old.issue()
    with pytest.raises(CertificateExpired, match=r"'CN=Old Root"):
        check(leaf, NO_TRUST, certificate=leaf.full_chain_pem)


def test_expired_trusted_root(inter: CA) -> None:
    old = CA.new("Old Trusted Root", now=T0, not_after=T0 - SECOND)
    leaf = old.issue()
    with pytest.raises(CertificateExpired, match=r"the trusted root CA 'CN=Old Trusted Root"):
        check(leaf, TrustStore.of([old.cert]))


def test_not_yet_valid_leaf(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(not_before=T0 + dt.timedelta(days=1))
    with pytest.raises(NotYetValid, match=r"the leaf 'CN=leaf\.example' is not valid before"):
        check(leaf, trust)


# --- chain -------------------------------------------------------------------------------------


def test_issuer_not_found_names_the_missing_issuer(leaf: Leaf) -> None:
    with pytest.raises(IssuerNotFound, match=r"its issuer 'CN=Test Root,O=clustercert tests'") as i:
        check(leaf, NO_TRUST)
    assert i.value.error_code == "issuer_not_found"
    assert i.value.http_status == 404
    assert i.value.batch_http_status == 400
    with pytest.raises(IssuerNotFound, match=r"its issuer 'CN=Test Intermediate"):
        check(leaf, NO_TRUST, certificate=leaf.cert_pem)


def test_unrelated_extra_certificate(leaf: Leaf, trust: TrustStore) -> None:
    stranger = CA.new("Unrelated CA", now=T0)
    with pytest.raises(ChainInvalid, match=r"'CN=Unrelated CA.* is not part of the chain") as i:
        check(leaf, trust, certificate=leaf.chain_pem + stranger.cert_pem)
    assert i.value.error_code == "chain_invalid"


def test_intermediate_of_the_same_name_but_another_key(root: CA, leaf: Leaf) -> None:
    """A renewed intermediate with the same DN but a new key did not sign this leaf."""
    impostor = root.intermediate("Test Intermediate")
    with pytest.raises(ChainInvalid, match=r"its key does not verify the signature"):
        check(leaf, TrustStore.of([root.cert]), certificate=leaf.cert_pem + impostor.cert_pem)


def test_pathlen_violation(root: CA, trust: TrustStore) -> None:
    strict = root.intermediate("Pathlen Zero", path_length=0)
    leaf = strict.intermediate("Below Zero").issue()
    with pytest.raises(ChainInvalid, match=r"'CN=Pathlen Zero.* allows at most 0 intermediate"):
        check(leaf, trust)


@pytest.mark.parametrize(
    ("knobs", "pattern"),
    [
        ({"basic_constraints": False}, "has no basicConstraints extension"),
        (
            {
                "basic_constraints": False,
                "extensions": [(x509.BasicConstraints(ca=False, path_length=None), True)],
            },
            "basicConstraints say CA:FALSE",
        ),
    ],
    ids=["no-basic-constraints", "ca-false"],
)
def test_not_a_ca(root: CA, trust: TrustStore, knobs: dict[str, object], pattern: str) -> None:
    leaf = root.intermediate("Not A CA", **knobs).issue()  # type: ignore[arg-type]
    with pytest.raises(NotACA, match=pattern) as info:
        check(leaf, trust)
    assert info.value.error_code == "not_a_ca"


@pytest.mark.parametrize(
    "usages",
    [["digitalSignature", "cRLSign"], ["cRLSign"], ["digitalSignature"]],
    ids=["digsig-crlsign", "crlsign", "digsig"],
)
def test_issuer_key_usage_needs_key_cert_sign(
    root: CA, trust: TrustStore, usages: list[str]
) -> None:
    leaf = root.intermediate("No CertSign", key_usage=usages).issue()
    with pytest.raises(IssuerKeyUsage, match=r"CA 'CN=No CertSign.*does not include keyCertSign"):
        check(leaf, trust)


def test_issuer_key_usage_of_an_uploaded_root() -> None:
    bad_root = CA.new("CertSign-less Root", now=T0, key_usage=["digitalSignature", "cRLSign"])
    leaf = bad_root.issue()
    with pytest.raises(IssuerKeyUsage, match=r"CA 'CN=CertSign-less Root") as info:
        check(leaf, NO_TRUST, certificate=leaf.full_chain_pem)
    assert (info.value.error_code, info.value.http_status) == ("issuer_key_usage", 400)


def test_issuer_key_usage_with_key_cert_sign_alone_is_accepted(root: CA, trust: TrustStore) -> None:
    leaf = root.intermediate("CertSign Only", key_usage=["keyCertSign"]).issue()
    assert len(check(leaf, trust).chain) == 2


def test_ca_without_key_usage_is_accepted(root: CA, trust: TrustStore) -> None:
    """openssl req -x509 makes CAs without keyUsage, and OpenSSL accepts them."""
    leaf = root.intermediate("No KU", key_usage=False).issue()
    assert check(leaf, trust).chain[1].subject.rfc4514_string().startswith("CN=No KU")


def test_unknown_critical_extension_in_chain(root: CA, trust: TrustStore) -> None:
    odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    leaf = root.intermediate("Odd", extensions=[(odd, True)]).issue()
    with pytest.raises(ChainInvalid, match=r"unaccounted-for critical extensions"):
        check(leaf, trust)


def test_loop_of_cross_signed_cas(leaf: Leaf) -> None:
    a = CA.new("Loop A", now=T0)
    b = a.intermediate("Loop B")
    # a' : "Loop A" re-issued by B, so A' -> B -> A' would be a loop without a root.
    a_by_b = b.intermediate("Loop A")
    target = a_by_b.issue()
    upload = target.cert_pem + a_by_b.cert_pem + b.cert_pem
    with pytest.raises(ChainInvalid, match=r"form a loop: certificate 'CN=Loop B"):
        check(target, NO_TRUST, certificate=upload)


# --- policy ------------------------------------------------------------------------------------


def test_leaf_is_ca(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(is_ca=True)
    with pytest.raises(LeafIsCA, match=r"is a CA certificate.*needs an end-entity") as info:
        check(leaf, trust)
    assert info.value.error_code == "leaf_is_ca"


def test_self_signed_ca_as_keyed_leaf_gets_the_openssl_hint() -> None:
    selfie = self_signed(now=T0, is_ca=True)
    with pytest.raises(LeafIsCA, match=r"-addext basicConstraints=critical,CA:FALSE"):
        check(selfie, NO_TRUST, certificate=selfie.cert_pem)


KEYED_WITH_EKU = sorted(n for n, row in NAMES.items() if row.has_key and row.required_eku)


@pytest.mark.parametrize("name", KEYED_WITH_EKU)
def test_eku_per_name(inter: CA, trust: TrustStore, name: str) -> None:
    required = sorted(NAMES[name].required_eku)
    check(inter.issue(eku=required), trust, name=name)
    check(inter.issue(eku=None), trust, name=name)  # no EKU extension: any use
    for missing in required:
        others = [u for u in ("serverAuth", "clientAuth", "codeSigning") if u != missing]
        leaf = inter.issue(eku=others)
        with pytest.raises(MissingExtendedKeyUsage, match=f"lacks {missing}.*'{name}'") as info:
            check(leaf, trust, name=name)
        assert info.value.error_code == "missing_extended_key_usage"


def test_any_eku_alone_does_not_satisfy_server_auth(inter: CA, trust: TrustStore) -> None:
    """OpenSSL's purpose check does not take anyExtendedKeyUsage for serverAuth either."""
    with pytest.raises(MissingExtendedKeyUsage, match=r"anyExtendedKeyUsage"):
        check(inter.issue(eku=["anyExtendedKeyUsage"]), trust)


def test_intermediate_eku_restricts_the_chain(root: CA, trust: TrustStore) -> None:
    eku = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
    leaf = root.intermediate("Client CA", extensions=[(eku, False)]).issue()
    check(leaf, trust, name="ldap_client")
    with pytest.raises(MissingExtendedKeyUsage, match=r"CA 'CN=Client CA.* excludes serverAuth"):
        check(leaf, trust, name="api")


# (key type, keyUsage, accepted for serverAuth?) -- RFC 5280 4.2.1.12 with TLS 1.2 (ECDHE)/1.3
SERVER_KEY_USAGE = [
    ("ec256", ["digitalSignature"], True),
    ("ec256", ["digitalSignature", "nonRepudiation"], True),
    ("ec256", ["nonRepudiation"], False),
    ("ec256", ["dataEncipherment"], False),
    ("ec256", ["keyEncipherment"], False),
    ("ec256", ["keyAgreement"], False),
    ("rsa2048", ["digitalSignature"], True),
    ("rsa2048", ["keyEncipherment"], True),
    ("rsa2048", ["nonRepudiation"], False),
    ("rsa2048", ["dataEncipherment"], False),
    ("rsa2048", ["keyAgreement"], False),
    ("ed25519", ["digitalSignature"], True),
    ("ed25519", ["keyEncipherment"], False),
]


@pytest.mark.parametrize(("key_type", "usages", "accepted"), SERVER_KEY_USAGE)
def test_key_usage_for_server_auth(
    inter: CA, trust: TrustStore, key_type: str, usages: list[str], accepted: bool
) -> None:
    leaf = inter.issue(key_type=key_type, key_usage=usages, eku=["serverAuth"])
    if accepted:
        check(leaf, trust)
        return
    needed = "digitalSignature or keyEncipherment" if key_type == "rsa2048" else "digitalSignature"
    with pytest.raises(KeyUsageMismatch, match=f"lacks {needed}, which serverAuth") as info:
        check(leaf, trust)
    assert (info.value.error_code, info.value.http_status) == ("key_usage_mismatch", 400)
    assert "'proxy'" in info.value.description
    assert "unsuitable certificate purpose" in info.value.description


@pytest.mark.parametrize(
    ("key_type", "usages", "accepted"),
    [
        ("ec256", ["digitalSignature"], True),
        ("rsa2048", ["digitalSignature"], True),
        ("rsa2048", ["keyEncipherment"], False),  # a client signs CertificateVerify
        ("ec256", ["keyAgreement"], False),  # fixed-ECDH client auth: not in TLS 1.2/1.3 use
        ("ec256", ["nonRepudiation"], False),
    ],
)
def test_key_usage_for_client_auth(
    inter: CA, trust: TrustStore, key_type: str, usages: list[str], accepted: bool
) -> None:
    leaf = inter.issue(key_type=key_type, key_usage=usages, eku=["clientAuth"])
    if accepted:
        check(leaf, trust, name="ldap_client")
        return
    with pytest.raises(KeyUsageMismatch, match=r"lacks digitalSignature, which clientAuth"):
        check(leaf, trust, name="ldap_client")


def test_key_usage_for_both_usages_reports_the_first_missing(inter: CA, trust: TrustStore) -> None:
    """RSA keyEncipherment serves serverAuth but not clientAuth: 'syncer' needs both."""
    leaf = inter.issue(key_type="rsa2048", key_usage=["keyEncipherment"])
    check(leaf, trust, name="proxy")
    with pytest.raises(KeyUsageMismatch, match=r"clientAuth with an RSA-2048 key .*'syncer'"):
        check(leaf, trust, name="syncer")


def test_key_usage_names_the_key_agreement_qualifiers(inter: CA, trust: TrustStore) -> None:
    usage = x509.KeyUsage(False, False, False, False, True, False, False, True, False)
    leaf = inter.issue(key_usage=False, extensions=[(usage, True)])
    with pytest.raises(KeyUsageMismatch, match=r"keyUsage \(keyAgreement, encipherOnly\) lacks"):
        check(leaf, trust)


def test_no_key_usage_extension_allows_any_use(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(key_usage=False)
    for name in ("proxy", "ldap_client", "syncer"):
        check(leaf, trust, name=name)


def test_key_usage_is_not_judged_for_names_without_tls_use(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(key_usage=["nonRepudiation"], eku=None)
    check(leaf, trust, name="sso_service")


def test_key_usage_rule_comes_before_the_handshake(inter: CA, trust: TrustStore) -> None:
    """The issue #11 certificate: our precise message, not OpenSSL's generic one."""
    leaf = inter.issue("db.example", key_usage=["nonRepudiation"], eku=["serverAuth"])
    with pytest.raises(KeyUsageMismatch, match=r"keyUsage \(nonRepudiation\) lacks"):
        check(leaf, trust)


def test_openssl_made_leaf_with_non_repudiation_only(tmp_path: Path) -> None:
    """A certificate made by the openssl CLI, as the operator in issue #11 made it."""
    bad = openssl_ca_and_leaf(tmp_path, leaf_key_usage="critical,nonRepudiation", key="rsa")
    trust = TrustStore.of([x509.load_pem_x509_certificate(bad.ca_cert.read_bytes())])
    at = x509.load_pem_x509_certificate(bad.leaf_cert.read_bytes()).not_valid_before_utc
    with pytest.raises(KeyUsageMismatch, match=r"RSA-2048 key needs .*'proxy'"):
        validate_upload("proxy", bad.chain, bad.leaf_key.read_text(), at=at, trust=trust)
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = openssl_ca_and_leaf(good_dir, leaf_key_usage="critical,digitalSignature,keyEncipherment")
    trust = TrustStore.of([x509.load_pem_x509_certificate(good.ca_cert.read_bytes())])
    validate_upload("proxy", good.chain, good.leaf_key.read_text(), at=at, trust=trust)


def test_intermediate_any_eku_does_not_count(root: CA, trust: TrustStore) -> None:
    """As in OpenSSL's purpose check, which refuses such chains in a handshake."""
    any_eku = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    leaf = root.intermediate("Any CA", extensions=[(any_eku, False)]).issue()
    with pytest.raises(MissingExtendedKeyUsage, match=r"OpenSSL does not count anyExtendedKey"):
        check(leaf, trust)
    both = x509.ExtendedKeyUsage([*any_eku, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    check(root.intermediate("Any And Server CA", extensions=[(both, False)]).issue(), trust)


@pytest.mark.parametrize(("issuer_key", "digest"), [("rsa2048", "sha1"), ("ec256", "sha1"),
                                                    ("rsa2048", "md5")])  # fmt: skip
def test_insecure_signature_on_leaf(issuer_key: str, digest: str) -> None:
    root = CA.new(key_type=issuer_key, now=T0)
    leaf = root.issue(signature_hash=digest)  # type: ignore[arg-type]
    with pytest.raises(InsecureSignature, match=r"the leaf .* is signed with .*broken") as info:
        check(leaf, TrustStore.of([root.cert]))
    assert info.value.error_code == "insecure_signature"


def test_insecure_signature_on_intermediate(root: CA) -> None:
    rsa_root = CA.new("RSA Root", key_type="rsa2048", now=T0)
    leaf = rsa_root.intermediate("SHA1 Intermediate", signature_hash="sha1").issue()
    with pytest.raises(InsecureSignature, match=r"'CN=SHA1 Intermediate.*sha1WithRSAEncryption"):
        check(leaf, TrustStore.of([rsa_root.cert]))


def test_sha1_self_signature_of_a_root_is_exempt() -> None:
    old_root = CA.new("SHA1 Root", key_type="rsa2048", now=T0, signature_hash="sha1")
    leaf = old_root.issue()
    assert len(check(leaf, NO_TRUST, certificate=leaf.full_chain_pem).chain) == 2


# --- mtls_trusted_ca ---------------------------------------------------------------------------


def test_ca_bundle_of_unrelated_roots(root: CA) -> None:
    other = CA.new("Other Root", now=T0, not_after=T0 + dt.timedelta(days=10))
    result = validate_upload(
        "mtls_trusted_ca", root.cert_pem + other.cert_pem, None, at=T0, trust=NO_TRUST
    )
    assert result.chain == (root.cert, other.cert)
    assert result.not_after == other.cert.not_valid_after_utc  # the earliest
    assert any("'CN=Other Root" in w and "expires in 10 days" in w for w in result.warnings)


def test_ca_bundle_with_intermediate_and_root(root: CA, inter: CA) -> None:
    bundle = inter.cert_pem + root.cert_pem
    result = validate_upload("mtls_trusted_ca", bundle, None, at=T0, trust=NO_TRUST)
    assert len(result.chain) == 2


def test_ca_bundle_rejects_a_leaf(leaf: Leaf, root: CA) -> None:
    with pytest.raises(NotACA, match=r"'mtls_trusted_ca' holds CA certificates only"):
        validate_upload(
            "mtls_trusted_ca", root.cert_pem + leaf.cert_pem, None, at=T0, trust=NO_TRUST
        )


def test_ca_bundle_intermediate_needs_its_root(inter: CA) -> None:
    with pytest.raises(IssuerNotFound, match=r"'CN=Test Root"):
        validate_upload("mtls_trusted_ca", inter.cert_pem, None, at=T0, trust=NO_TRUST)


def test_ca_bundle_expired_ca(root: CA) -> None:
    old = CA.new("Expired Root", now=T0, not_after=T0 - SECOND)
    with pytest.raises(CertificateExpired, match=r"'CN=Expired Root"):
        validate_upload(
            "mtls_trusted_ca", root.cert_pem + old.cert_pem, None, at=T0, trust=NO_TRUST
        )


# --- order of checks (DESIGN §4.2) -------------------------------------------------------------


def test_order_parse_before_key_match(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue()
    with pytest.raises(WeakKey):
        check(leaf, trust, key=key_pem(new_key("rsa1024")))


def test_order_key_match_before_expiry(leaf: Leaf, trust: TrustStore) -> None:
    expired_at = leaf.cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(KeyValuesMismatch):
        check(leaf, trust, key=key_pem(new_key()), at=expired_at)


def test_order_expiry_before_chain(leaf: Leaf) -> None:
    with pytest.raises(CertificateExpired):
        check(leaf, NO_TRUST, at=leaf.cert.not_valid_after_utc + SECOND)


def test_order_not_yet_valid_before_chain(leaf: Leaf) -> None:
    with pytest.raises(NotYetValid):
        check(leaf, NO_TRUST, at=T0 - dt.timedelta(days=30))


def test_order_chain_before_policy(inter: CA) -> None:
    leaf = inter.issue(is_ca=True)
    with pytest.raises(IssuerNotFound):
        check(leaf, NO_TRUST)


# --- openssl-made certificates -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["rsa", "ec"])
@pytest.mark.parametrize("ca_key_usage", [True, False])
def test_openssl_made_chain(tmp_path: Path, key: str, ca_key_usage: bool) -> None:
    pair = openssl_ca_and_leaf(tmp_path, key=key, ca_key_usage=ca_key_usage)  # type: ignore[arg-type]
    ca = x509.load_pem_x509_certificate(pair.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(pair.leaf_cert.read_bytes())
    at = leaf.not_valid_before_utc + dt.timedelta(hours=1)
    result = validate_upload(
        "syncer",
        pair.chain,
        pair.leaf_key.read_text(),
        at=at,
        trust=TrustStore.of([]).with_extra([ca]),
    )
    assert result.chain == (leaf, ca)
    assert "127.0.0.1" in result.summary()["sans"]  # type: ignore[operator]


# --- trust store -------------------------------------------------------------------------------


def test_trust_store_system_plus_extra(root: CA) -> None:
    store = TrustStore.system(extra=[root.cert])
    assert store.roots[-1] == root.cert
    assert store.issuers_named(root.cert.subject) == (root.cert,)
    assert TrustStore.of([]).with_extra([root.cert]).roots == (root.cert,)
    if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        assert len(store.roots) > 50


# --- batches -----------------------------------------------------------------------------------


def test_validate_all_returns_every_item_in_order(leaf: Leaf, root: CA, trust: TrustStore) -> None:
    items = [
        UploadItem("proxy", leaf.chain_pem, leaf.key_pem),
        UploadItem("mtls_trusted_ca", root.cert_pem, None),
    ]
    results = validate_all(items, at=T0, trust=trust)
    assert [r.name for r in results] == ["proxy", "mtls_trusted_ca"]


def test_validate_all_issuer_not_found_is_400_in_a_batch(
    leaf: Leaf, root: CA, trust: TrustStore
) -> None:
    stranger = CA.new("Missing Root", now=T0).issue()
    items = [
        UploadItem("api", leaf.chain_pem, leaf.key_pem),
        UploadItem("proxy", stranger.cert_pem, stranger.key_pem),
        UploadItem("cm", leaf.chain_pem, None),
    ]
    with pytest.raises(
        IssuerNotFound, match=r"2 of 3 certificates failed.*'proxy' \(item 1\)"
    ) as i:
        validate_all(items, at=T0, trust=trust)
    error = i.value
    assert isinstance(error, BatchIssuerNotFound)
    assert error.error_code == "issuer_not_found"
    assert error.http_status == 400
    assert error.errors == [
        {
            "name": "proxy",
            "error_code": "issuer_not_found",
            "description": error.errors[0]["description"],  # type: ignore[index]
            "index": 1,
        },
        {
            "name": "cm",
            "error_code": "missing_key",
            "description": error.errors[1]["description"],  # type: ignore[index]
            "index": 2,
        },
    ]
    assert error.to_body()["errors"] == error.errors


def test_validate_all_status_is_the_first_failing_items(leaf: Leaf, trust: TrustStore) -> None:
    items = [
        UploadItem("proxy", leaf.chain_pem, leaf.key_pem),
        UploadItem("api", leaf.chain_pem, key_pem(new_key())),
    ]
    with pytest.raises(CertificateExpired) as info:
        validate_all(
            [UploadItem("api", leaf.chain_pem, leaf.key_pem), *items],
            at=leaf.cert.not_valid_after_utc + SECOND,
            trust=trust,
        )
    assert info.value.http_status == 406
    assert [e["index"] for e in info.value.errors or []] == [0, 1, 2]


def test_validate_all_duplicate_and_unknown_names(leaf: Leaf, trust: TrustStore) -> None:
    items = [
        UploadItem("bogus", leaf.chain_pem, leaf.key_pem),
        UploadItem("proxy", leaf.chain_pem, leaf.key_pem),
        UploadItem("proxy", leaf.chain_pem, leaf.key_pem),
    ]
    with pytest.raises(UnknownCertificate) as info:
        validate_all(items, at=T0, trust=trust)
    assert info.value.http_status == 403
    codes = [(e["index"], e["error_code"]) for e in info.value.errors or []]
    assert codes == [(0, "unknown_certificate"), (2, "invalid_schema")]
    with pytest.raises(InvalidSchema, match=r"appears more than once"):
        validate_all(items[1:], at=T0, trust=trust)


def test_errors_are_one_tree() -> None:
    assert issubclass(BatchIssuerNotFound, CertificateRejected)
    assert issubclass(CertificateRejected, ClusterCertError)


def test_ed25519_leaf_key_with_pkcs8(inter: CA, trust: TrustStore) -> None:
    leaf = inter.issue(key=ed25519.Ed25519PrivateKey.generate())
    assert check(leaf, trust).summary()["key_bits"] == 256


# --- properties --------------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def deep_chain(root: CA) -> tuple[Leaf, tuple[x509.Certificate, ...]]:
    lower = root.intermediate("Upper").intermediate("Lower")
    leaf = lower.issue("deep.example")
    return leaf, (leaf.cert, *leaf.issuers)


@PROPERTY
@given(order=st.permutations(range(4)), junk=st.sampled_from(["", "junk\n", "\r\n"]))
def test_property_every_order_normalises_to_leaf_first(
    deep_chain: tuple[Leaf, tuple[x509.Certificate, ...]], order: list[int], junk: str
) -> None:
    leaf, certs = deep_chain
    upload = junk.join(cert_pem(certs[i]) for i in order)
    if junk == "\r\n":
        upload = upload.replace("\n", "\r\n")
    result = check(leaf, NO_TRUST, certificate=upload)
    assert result.chain == certs


garbage = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.builds(
        lambda label, body: f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n",
        st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "X"]),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n:"),
    ),
)


@PROPERTY
@given(certificate=garbage, key=st.one_of(st.none(), garbage))
def test_property_garbage_is_only_ever_rejected(
    leaf: Leaf, trust: TrustStore, certificate: str, key: str | None
) -> None:
    with pytest.raises(CertificateRejected):
        check(leaf, trust, certificate=certificate, key=key)


@PROPERTY
@given(data=st.data())
def test_property_damaged_pem_never_escapes_the_error_tree(
    leaf: Leaf, trust: TrustStore, data: st.DataObject
) -> None:
    """Flip characters anywhere in a valid upload: accepted or rejected, never a crash."""
    chain, key = list(leaf.chain_pem), list(leaf.key_pem)
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from([chain, key]))
        index = data.draw(st.integers(0, len(target) - 1))
        target[index] = data.draw(st.characters(codec="latin-1"))
    with contextlib.suppress(CertificateRejected):
        check(leaf, trust, certificate="".join(chain), key="".join(key))


@PROPERTY
@given(key=garbage)
def test_property_garbage_key_beside_a_valid_chain_is_only_ever_rejected(
    leaf: Leaf, trust: TrustStore, key: str
) -> None:
    with pytest.raises(CertificateRejected):
        check(leaf, trust, key=key)
