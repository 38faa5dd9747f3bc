"""Pure X.509 helpers: parse PEM, fingerprint, describe keys, issue internal certificates.

Nothing here reads the clock: every time is a parameter. Validation policy (DESIGN §5) lives in
:mod:`clustercert.validation`; this module only knows how to read and make certificates.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustercert.errors import EncryptedKey, InvalidCertificate

__all__ = [
    "EKU_OIDS",
    "INSECURE_SIGNATURE_OIDS",
    "MAX_FIELD_BYTES",
    "MAX_PEM_BLOCKS",
    "CertificateAuthority",
    "IssuedPair",
    "ParsedCertificates",
    "PemBlock",
    "certificates_to_pem",
    "describe_key",
    "describe_name",
    "describe_non_pem",
    "fingerprint_sha256",
    "is_issued_by",
    "is_self_signed",
    "issue_leaf",
    "key_bits",
    "key_to_pem",
    "load_certificates",
    "load_private_key",
    "make_csr",
    "new_ca",
    "new_private_key",
    "read_pem_blocks",
    "recorded_warnings",
    "san_count",
    "sign_csr",
    "signature_algorithm_name",
    "signature_verifies",
    "spki_sha256",
    "subject_alt_names",
]

EKU_OIDS: dict[str, x509.ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
}

# Internal certificates are backdated a little so that a node whose clock lags slightly does
# not see them as not yet valid.
_BACKDATE = dt.timedelta(minutes=5)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 of the DER certificate, lowercase hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def spki_sha256(public_key: PublicKeyTypes) -> str:
    """``SHA256:<hex>`` of the SubjectPublicKeyInfo: names a key without revealing it."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return "SHA256:" + digest.finalize().hex()[:16]


def key_bits(public_key: PublicKeyTypes) -> int:
    """Key size in bits (Ed25519: 256, Ed448: 456)."""
    if isinstance(public_key, rsa.RSAPublicKey | dsa.DSAPublicKey | ec.EllipticCurvePublicKey):
        return public_key.key_size
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return 256
    if isinstance(public_key, ed448.Ed448PublicKey):
        return 456
    raise ValueError(f"unsupported public key type {type(public_key).__name__}")


def describe_key(public_key: PublicKeyTypes) -> str:
    """A short human name for a key type: ``RSA-2048``, ``EC-P256``, ``Ed25519``, ``DSA-1024``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P256", "secp384r1": "P384", "secp521r1": "P521"}
        return "EC-" + curve.get(public_key.curve.name, public_key.curve.name)
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA-{public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__


def certificates_to_pem(certs: Iterable[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def key_to_pem(key: PrivateKeyTypes) -> str:
    """Unencrypted PKCS#8 PEM. Callers must keep the result out of logs and errors."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """The key type of every internal certificate: ECDSA P-256."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class IssuedPair:
    """A certificate chain (leaf first, then the CA) and its private key, both PEM."""

    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class CertificateAuthority:
    """The cluster's internal CA."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return certificates_to_pem([self.cert])

    @property
    def key_pem(self) -> str:
        return key_to_pem(self.key)

    @classmethod
    def from_pem(cls, cert_pem: str | bytes, key_pem: str | bytes) -> CertificateAuthority:
        cert_bytes = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        key_bytes = key_pem.encode() if isinstance(key_pem, str) else key_pem
        key = serialization.load_pem_private_key(key_bytes, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the internal CA key must be an EC key")
        return cls(x509.load_pem_x509_certificate(cert_bytes), key)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        if san.startswith("urn:"):
            names.append(x509.UniformResourceIdentifier(san))
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    *,
    is_ca: bool,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    """What every internal certificate has: validity (from ``now``, backdated a little for
    clock skew), basic constraints, key usage, SKI."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def new_ca(
    common_name: str, *, now: dt.datetime, validity: dt.timedelta = dt.timedelta(days=3650)
) -> CertificateAuthority:
    """A self-signed ECDSA P-256 root CA valid for ``validity`` from ``now``."""
    key = new_private_key()
    name = _name(common_name, "clustercert")
    builder = _base_builder(name, name, key.public_key(), is_ca=True, now=now, validity=validity)
    return CertificateAuthority(builder.sign(key, hashes.SHA256()), key)


def _leaf_builder(
    ca: CertificateAuthority,
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    *,
    sans: Sequence[str],
    eku: Iterable[str],
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    builder = _base_builder(
        subject, ca.cert.subject, public, is_ca=False, now=now, validity=validity
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    usages = [EKU_OIDS[u] for u in sorted(eku)]
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_general_names(sans)), critical=False
        )
    return builder


def issue_leaf(
    ca: CertificateAuthority,
    common_name: str,
    *,
    sans: Sequence[str],
    eku: Iterable[str],
    now: dt.datetime,
    validity: dt.timedelta = dt.timedelta(days=365),
) -> IssuedPair:
    """Issue an ECDSA P-256 leaf signed by ``ca``; the chain returned is leaf then CA."""
    key = new_private_key()
    builder = _leaf_builder(
        ca, _name(common_name), key.public_key(), sans=sans, eku=eku, now=now, validity=validity
    )
    cert = builder.sign(ca.key, hashes.SHA256())
    return IssuedPair(certificates_to_pem([cert, ca.cert]), key_to_pem(key))


def sign_csr(
    ca: CertificateAuthority,
    csr_pem: str,
    common_name: str,
    *,
    sans: Sequence[str],
    eku: Iterable[str],
    now: dt.datetime,
    validity: dt.timedelta = dt.timedelta(days=365),
) -> str:
    """Sign a CSR's public key for ``common_name`` (the CSR's own subject is ignored).

    Raises ``ValueError`` when the CSR does not parse, has a bad signature, or an unsupported key.
    """
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    if not csr.is_signature_valid:
        raise ValueError("the CSR signature does not verify")
    public = csr.public_key()
    if not isinstance(
        public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    ):
        raise ValueError(f"unsupported CSR key type {type(public).__name__}")
    builder = _leaf_builder(
        ca, _name(common_name), public, sans=sans, eku=eku, now=now, validity=validity
    )
    return certificates_to_pem([builder.sign(ca.key, hashes.SHA256())])


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str) -> str:
    """A CSR for ``common_name`` signed with ``key`` (used by agents when they join)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


# --- parsing untrusted uploads ---------------------------------------------------------------
# Everything below reads operator uploads. Foreign exceptions (ValueError, TypeError,
# UnsupportedAlgorithm, binascii.Error) are translated here into the error tree, with a
# description that names what was found and how to fix it. Private key material never appears
# in a description: only labels, positions and key types.

MAX_FIELD_BYTES = 1 << 20
"""Upper bound on one PEM field (the API body is capped at 1 MiB too)."""

MAX_PEM_BLOCKS = 16
"""Upper bound on PEM blocks in one field: a chain, or a CA bundle, is never longer."""

_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 #]{1,64})-----")
_CERT_LABELS = frozenset({"CERTIFICATE", "X509 CERTIFICATE"})
_KEY_LABELS = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "DSA PRIVATE KEY"})
_ENCRYPTED_KEY_HINT = (
    "decrypt it first with: openssl pkey -in key.pem -out key-decrypted.pem "
    "(it asks for the passphrase), then upload key-decrypted.pem"
)

# Signature algorithms whose hash is broken (collisions): refused on leaves and intermediates.
INSECURE_SIGNATURE_OIDS: dict[str, str] = {
    "1.2.840.113549.1.1.2": "md2WithRSAEncryption",
    "1.2.840.113549.1.1.3": "md4WithRSAEncryption",
    "1.2.840.113549.1.1.4": "md5WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.3.14.3.2.29": "sha1WithRSASignature",
    "1.2.840.10040.4.3": "dsa-with-sha1",
    "1.2.840.10045.4.1": "ecdsa-with-SHA1",
}

_RSA_PKCS1_LEGACY = frozenset(
    {"1.2.840.113549.1.1.3", "1.2.840.113549.1.1.4", "1.2.840.113549.1.1.5", "1.3.14.3.2.29"}
)
_PKCS7_DATA = bytes.fromhex("06092a864886f70d010701")
_PKCS7_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
# warnings.catch_warnings swaps process-wide state, so every use here is serialised (re-entrant:
# a caller may hold it while parsing).
_WARNINGS_LOCK = threading.RLock()


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record, instead of emitting, every warning raised inside; serialised across threads.

    cryptography warns (CryptographyDeprecationWarning) about certificates it accepts but that
    break DER or RFC 5280 rules. For uploads such a warning is information about the input, not
    about our code: callers turn it into a note, or drop it. It must not escape as an exception
    (pytest runs with warnings as errors) nor as noise on stderr.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@dataclass(frozen=True)
class PemBlock:
    """One ``-----BEGIN label-----`` ... ``-----END label-----`` block of a field.

    ``position`` is 1-based among the field's blocks; ``headers`` are RFC 1421 headers such as
    ``Proc-Type: 4,ENCRYPTED``; ``text`` is the block itself with LF line ends.
    """

    label: str
    position: int
    headers: tuple[tuple[str, str], ...]
    der: bytes
    text: str

    @property
    def encrypted(self) -> bool:
        return self.label == "ENCRYPTED PRIVATE KEY" or any(
            name.lower() == "proc-type" and "ENCRYPTED" in value.upper()
            for name, value in self.headers
        )


@dataclass(frozen=True)
class ParsedCertificates:
    """The certificates of a field, in upload order, and what the parser noticed on the way.

    ``notes`` holds the warnings cryptography raises for certificates it accepts but considers
    malformed (a serial number that is not positive, ...), one readable line each.
    """

    certificates: tuple[x509.Certificate, ...]
    notes: tuple[str, ...]


def _raw_bytes(text: str) -> bytes:
    """The bytes behind ``text``, as far as they can be recovered.

    Binary files reach us either decoded as latin-1 (one code point per byte) or, from the CLI,
    as UTF-8 with ``surrogateescape``; both round-trip to the original bytes.
    """
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "replace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _field_size_check(text: str, field: str) -> bytes:
    raw = _raw_bytes(text)
    if len(raw) > MAX_FIELD_BYTES:
        raise InvalidCertificate(
            f"the {field} is {len(raw)} bytes; at most {MAX_FIELD_BYTES} bytes (1 MiB) are "
            f"accepted: upload only the certificate chain (leaf, intermediates, root)"
        )
    return raw


def read_pem_blocks(text: str, *, field: str) -> list[PemBlock]:
    """Split ``text`` into PEM blocks, ignoring any text around them.

    CRLF and CR line ends are accepted. Raises :class:`InvalidCertificate` when the field is over
    budget (:data:`MAX_FIELD_BYTES`, :data:`MAX_PEM_BLOCKS`), when a block has no END line
    (truncated) or is not valid base64, and when there is no PEM block at all: then the
    description names the format found (DER, PKCS#12, PKCS#7, bare base64, binary, text) and the
    command that converts it. ``field`` ("certificate" or "key") names the field in messages.
    """
    raw = _field_size_check(text, field)
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    begins = list(_BEGIN.finditer(normalised))
    if len(begins) > MAX_PEM_BLOCKS:
        raise InvalidCertificate(
            f"the {field} holds {len(begins)} PEM blocks; at most {MAX_PEM_BLOCKS} are accepted: "
            f"upload only the leaf and its chain"
        )
    if not begins:
        raise InvalidCertificate(describe_non_pem(raw, field=field))
    blocks: list[PemBlock] = []
    for position, begin in enumerate(begins, start=1):
        label = begin.group(1)
        stop = begins[position].start() if position < len(begins) else len(normalised)
        end_marker = f"-----END {label}-----"
        end = normalised.find(end_marker, begin.end(), stop)
        if end < 0:
            raise InvalidCertificate(
                f"PEM block {position} of the {field} ({label}) has no '{end_marker}' line: the "
                f"text is truncated; copy the whole file again"
            )
        body = normalised[begin.end() : end]
        headers, der = _pem_body(body, label=label, position=position, field=field)
        block_text = normalised[begin.start() : end + len(end_marker)] + "\n"
        blocks.append(PemBlock(label, position, headers, der, block_text))
    return blocks


def _pem_body(
    body: str, *, label: str, position: int, field: str
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    headers: list[tuple[str, str]] = []
    data_lines: list[str] = []
    for line in body.split("\n"):
        stripped = line.strip()
        if not stripped:
            continue
        # base64 never contains ':', so a line with one is an RFC 1421 header.
        if ":" in stripped and not data_lines:
            name, _, value = stripped.partition(":")
            headers.append((name.strip(), value.strip()))
        else:
            data_lines.append(stripped)
    try:
        der = base64.b64decode("".join(data_lines), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCertificate(
            f"PEM block {position} of the {field} ({label}) is not valid base64: the text was "
            f"damaged (edited, truncated or re-wrapped); copy the whole file again"
        ) from None
    if not der:
        raise InvalidCertificate(
            f"PEM block {position} of the {field} ({label}) is empty; copy the whole file again"
        )
    return tuple(headers), der


def describe_non_pem(raw: bytes, *, field: str) -> str:
    """Name the format of a field that holds no PEM block, and how to convert it to PEM."""
    stripped = raw.strip()
    if not stripped:
        what = "certificate chain" if field == "certificate" else "private key"
        return f"the {field} is empty: paste the PEM {what} (text starting with '-----BEGIN')"
    if stripped[:1] == b"\x30":
        # Only the start may be stripped: a DER file can end in a byte that looks like space.
        return _describe_der(raw.lstrip(), field=field, how="DER")
    compact = b"".join(stripped.split())
    if re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", compact) and len(compact) >= 16:
        try:
            decoded = base64.b64decode(compact + b"=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded[:1] == b"\x30":
            return _describe_der(decoded, field=field, how="base64")
    if _looks_binary(stripped):
        return (
            f"the {field} is binary data ({len(raw)} bytes) in no format clustercert recognises; "
            f"it must be PEM text starting with '-----BEGIN'"
        )
    if stripped.startswith(b"ssh-") or stripped.startswith(b"ecdsa-sha2-"):
        return f"the {field} is an SSH public key, not an X.509 PEM {field}"
    return (
        f"the {field} contains no PEM block ('-----BEGIN ...-----' line not found); paste the "
        f"PEM text, including the BEGIN and END lines"
    )


def _looks_binary(data: bytes) -> bool:
    sample = data[:4096]
    controls = sum(1 for b in sample if b < 0x09 or 0x0E <= b < 0x20 or b == 0x7F)
    return b"\x00" in sample or controls * 10 > len(sample)


def _describe_der(der: bytes, *, field: str, how: str) -> str:
    """``how`` is "DER" (binary) or "base64" (DER in base64 without BEGIN/END lines)."""
    bare = how == "base64"
    form = " in bare base64 (no BEGIN/END lines)" if bare else ""
    # Bare base64 must be decoded to DER before openssl can convert it.
    decode = "base64 -d file.b64 > file.der && " if bare else ""

    def found(what: str) -> str:
        return f"the {field} is {what}{form}, not PEM"

    if _is_pkcs12(der):
        return (
            f"{found('a PKCS#12 (.p12/.pfx) bundle')}; extract PEM with: {decode}"
            f"openssl pkcs12 -in file.der -nokeys -out chain.pem and "
            f"openssl pkcs12 -in file.der -nocerts -nodes -out key.pem"
        )
    if _PKCS7_SIGNED_DATA in der[:32]:
        return (
            f"{found('a PKCS#7 (.p7b) certificate bundle')}; convert it with: {decode}"
            f"openssl pkcs7 -inform der -in file.der -print_certs -out chain.pem"
        )
    with recorded_warnings():
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            pass
        else:
            return (
                f"{found('a DER-encoded certificate')}; convert it with: {decode}"
                f"openssl x509 -inform der -in file.der -out cert.pem"
            )
        try:
            x509.load_der_x509_csr(der)
        except ValueError:
            pass
        else:
            return (
                f"{found('a certificate signing request (CSR)')}; a CSR is not a certificate: "
                f"have your CA sign it and upload the certificate it returns"
            )
        try:
            serialization.load_der_private_key(der, password=None)
        except TypeError:
            return (
                f"{found('an encrypted DER private key')}; decrypt and convert it with: "
                f"{decode}openssl pkey -inform der -in file.der -out key.pem"
            )
        except (ValueError, UnsupportedAlgorithm):
            pass
        else:
            return (
                f"{found('a DER-encoded private key')}; convert it with: {decode}"
                f"openssl pkey -inform der -in file.der -out key.pem"
            )
    return (
        f"{found('ASN.1 (DER) data that is neither a certificate nor a private key')}; it "
        f"must be PEM text starting with '-----BEGIN'"
    )


def _is_pkcs12(der: bytes) -> bool:
    """PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo (pkcs7-data), ... }."""
    length = der[1] if len(der) > 1 else 0
    start = 2 + (length & 0x7F if length & 0x80 else 0)
    return der[start : start + 3] == b"\x02\x01\x03" and _PKCS7_DATA in der[start : start + 24]


def _misplaced_block(block: PemBlock, *, field: str) -> str:
    where = f"PEM block {block.position} of the {field} is a {block.label}"
    if block.label in _KEY_LABELS or block.label.endswith("PRIVATE KEY"):
        return f"{where}: private keys go in the key field, not with the certificates"
    if block.label in _CERT_LABELS:
        return f"{where}: certificates go in the certificate field, not with the key"
    if block.label == "TRUSTED CERTIFICATE":
        return (
            f"{where} (OpenSSL's trust format); convert it to a plain certificate with: "
            f"openssl x509 -in cert.pem -out plain.pem"
        )
    if block.label in ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"):
        return (
            f"{where}: a CSR is not a certificate; have your CA sign it and upload the "
            f"certificate it returns"
        )
    if block.label == "PKCS7":
        return f"{where}; convert it with: openssl pkcs7 -in bundle.p7b -print_certs -out chain.pem"
    return f"{where}, which does not belong in the {field}"


def load_certificates(text: str) -> ParsedCertificates:
    """Parse the certificate field: one or more ``CERTIFICATE`` PEM blocks, any order.

    Raises :class:`InvalidCertificate` for anything else in the field (a private key, a CSR,
    PKCS#7, non-PEM input: see :func:`read_pem_blocks`), for a block that is not a well-formed
    X.509 certificate (including malformed extensions), and for an unsupported public key.
    """
    blocks = read_pem_blocks(text, field="certificate")
    certs: list[x509.Certificate] = []
    notes: list[str] = []
    for block in blocks:
        if block.label not in _CERT_LABELS:
            raise InvalidCertificate(_misplaced_block(block, field="certificate"))
        cert, cert_notes = _load_certificate(block)
        certs.append(cert)
        notes.extend(cert_notes)
    return ParsedCertificates(tuple(certs), tuple(notes))


def _load_certificate(block: PemBlock) -> tuple[x509.Certificate, list[str]]:
    where = f"PEM block {block.position} of the certificate"
    with recorded_warnings() as caught:
        try:
            cert = x509.load_der_x509_certificate(block.der)
            # Touch every lazily parsed part now, so malformed input fails here, with a
            # message, rather than later in a check that does not expect it.
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            _ = cert.serial_number
            _ = cert.not_valid_before_utc, cert.not_valid_after_utc
            _ = cert.signature_algorithm_oid
            extensions = cert.extensions
            for ext in extensions:
                _ = ext.value
        except (
            ValueError,
            TypeError,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
        ) as exc:
            raise InvalidCertificate(
                f"{where} is not a well-formed X.509 certificate ({_reason(exc)}); "
                f"export it again from your CA"
            ) from None
        try:
            cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidCertificate(
                f"{where} has a public key clustercert cannot use ({_reason(exc)}); use an "
                f"RSA (2048+ bits), ECDSA (P-256, P-384, P-521) or Ed25519/Ed448 key"
            ) from None
    notes = {
        f"certificate {describe_name(cert.subject)} is not strictly conforming: {w.message}": None
        for w in caught
    }
    return cert, list(notes)


def _reason(exc: BaseException) -> str:
    """cryptography's message, shortened to its first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def load_private_key(text: str) -> PrivateKeyTypes:
    """Parse the key field: exactly one unencrypted PKCS#1, PKCS#8 or SEC1 PEM private key.

    ``EC PARAMETERS`` blocks (written by ``openssl ecparam -genkey``) are ignored. Raises
    :class:`EncryptedKey` for an encrypted key (PKCS#8 or legacy ``Proc-Type``), and
    :class:`InvalidCertificate` for non-PEM input, a certificate in the key field, several
    keys, or a key that does not parse. Key strength is not judged here.
    """
    blocks = [b for b in read_pem_blocks(text, field="key") if b.label != "EC PARAMETERS"]
    keys: list[PemBlock] = []
    for block in blocks:
        if block.encrypted:
            raise EncryptedKey(
                f"the private key (PEM block {block.position}, {block.label}) is encrypted "
                f"with a passphrase; {_ENCRYPTED_KEY_HINT}"
            )
        if block.label == "OPENSSH PRIVATE KEY":
            raise InvalidCertificate(
                "the key is in OpenSSH's format; convert a copy with: "
                "ssh-keygen -p -m PKCS8 -N '' -f key-copy (it rewrites the file in place)"
            )
        if block.label not in _KEY_LABELS:
            raise InvalidCertificate(_misplaced_block(block, field="key"))
        keys.append(block)
    if not keys:
        raise InvalidCertificate("the key field holds no private key; upload the leaf's key")
    if len(keys) > 1:
        raise InvalidCertificate(
            f"the key field holds {len(keys)} private keys; upload only the key of the leaf "
            f"certificate"
        )
    block = keys[0]
    try:
        return serialization.load_pem_private_key(block.text.encode("ascii"), password=None)
    except TypeError:
        raise EncryptedKey(
            f"the private key ({block.label}) is encrypted with a passphrase; {_ENCRYPTED_KEY_HINT}"
        ) from None
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        # cryptography's message is generic, but say nothing derived from the key bytes.
        raise InvalidCertificate(
            f"the private key ({block.label}) could not be read: it is damaged, of an "
            f"unsupported type, or uses explicit EC parameters; export it again as PKCS#8 with: "
            f"openssl pkey -in key.pem -out key-pkcs8.pem"
        ) from None


def describe_name(name: x509.Name) -> str:
    """A distinguished name for messages: ``'CN=leaf,O=Example'`` or ``(empty name)``."""
    text = name.rfc4514_string()
    return f"'{text}'" if text else "(empty name)"


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The SAN entries as text: DNS names and IPs as-is, other kinds prefixed (``email:``)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for general in san:
        if isinstance(general, x509.DNSName):
            names.append(general.value)
        elif isinstance(general, x509.IPAddress):
            names.append(str(general.value))
        elif isinstance(general, x509.RFC822Name):
            names.append(f"email:{general.value}")
        elif isinstance(general, x509.UniformResourceIdentifier):
            names.append(f"URI:{general.value}")
        elif isinstance(general, x509.DirectoryName):
            names.append(f"DirName:{general.value.rfc4514_string()}")
        else:
            names.append(type(general).__name__)
    return names


def san_count(cert: x509.Certificate) -> int:
    try:
        return len(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return 0


def signature_verifies(cert: x509.Certificate, issuer_key: PublicKeyTypes) -> bool:
    """Whether ``issuer_key`` verifies ``cert``'s signature (names are not compared).

    Unlike ``Certificate.verify_directly_issued_by`` this also checks SHA-1 and MD5 signatures,
    so that they can be reported as insecure rather than as broken. An algorithm that cannot be
    checked at all (MD2, or a key that does not fit the algorithm) verifies as False.
    """
    dotted = cert.signature_algorithm_oid.dotted_string
    signature, tbs = cert.signature, cert.tbs_certificate_bytes
    try:
        params = cert.signature_algorithm_parameters
        digest = cert.signature_hash_algorithm
        if isinstance(issuer_key, rsa.RSAPublicKey):
            # cryptography gives no parameters for legacy PKCS#1 hashes (SHA-1, MD5).
            if params is None and dotted in _RSA_PKCS1_LEGACY:
                params = padding.PKCS1v15()
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or digest is None:
                return False
            issuer_key.verify(signature, tbs, params, digest)
        elif isinstance(issuer_key, ec.EllipticCurvePublicKey):
            if params is None and dotted == "1.2.840.10045.4.1" and digest is not None:
                params = ec.ECDSA(digest)  # ecdsa-with-SHA1, likewise without parameters
            if not isinstance(params, ec.ECDSA):
                return False
            issuer_key.verify(signature, tbs, params)
        elif isinstance(issuer_key, dsa.DSAPublicKey):
            if digest is None or not dotted.startswith(
                ("1.2.840.10040.4.", "2.16.840.1.101.3.4.3.")
            ):
                return False
            issuer_key.verify(signature, tbs, digest)
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            if dotted not in ("1.3.101.112", "1.3.101.113"):
                return False
            issuer_key.verify(signature, tbs)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer``'s subject is ``cert``'s issuer name and its key verifies ``cert``."""
    return cert.issuer == issuer.subject and signature_verifies(cert, issuer.public_key())


def is_self_signed(cert: x509.Certificate) -> bool:
    """Self-issued (subject equals issuer) and the signature verifies with its own key."""
    return is_issued_by(cert, cert)


_SIGNATURE_NAMES: dict[str, str] = {
    **{
        oid.dotted_string: attr.lower().replace("_", "-")
        for attr, oid in vars(x509.SignatureAlgorithmOID).items()
        if isinstance(oid, x509.ObjectIdentifier)
    },
    **INSECURE_SIGNATURE_OIDS,
}


def signature_algorithm_name(cert: x509.Certificate) -> str:
    """A readable name of ``cert``'s signature algorithm (its dotted OID if unknown)."""
    dotted = cert.signature_algorithm_oid.dotted_string
    return _SIGNATURE_NAMES.get(dotted, dotted)
