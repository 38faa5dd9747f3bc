"""Pure X.509 helpers: parse PEM, fingerprint, describe keys, issue internal certificates.

Nothing here reads the clock: every time is a parameter. Validation policy (DESIGN §5) lives in
:mod:`clustercert.validation`; this module only knows how to read and make certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "EKU_OIDS",
    "CertificateAuthority",
    "IssuedPair",
    "certificates_to_pem",
    "describe_key",
    "fingerprint_sha256",
    "issue_leaf",
    "key_bits",
    "key_to_pem",
    "make_csr",
    "new_ca",
    "new_private_key",
    "sign_csr",
    "spki_sha256",
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
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def new_ca(common_name: str, *, now: dt.datetime, days: int = 3650) -> CertificateAuthority:
    """A self-signed ECDSA P-256 root CA valid for ``days`` from ``now``."""
    key = new_private_key()
    name = _name(common_name, "clustercert")
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def _leaf_builder(
    ca: CertificateAuthority,
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    *,
    sans: Sequence[str],
    eku: Iterable[str],
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
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
    days: int = 365,
) -> IssuedPair:
    """Issue an ECDSA P-256 leaf signed by ``ca``; the chain returned is leaf then CA."""
    key = new_private_key()
    builder = _leaf_builder(
        ca, _name(common_name), key.public_key(), sans=sans, eku=eku, now=now, days=days
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
    days: int = 365,
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
    builder = _leaf_builder(ca, _name(common_name), public, sans=sans, eku=eku, now=now, days=days)
    return certificates_to_pem([builder.sign(ca.key, hashes.SHA256())])


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str) -> str:
    """A CSR for ``common_name`` signed with ``key`` (used by agents when they join)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
