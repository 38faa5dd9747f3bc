"""Certificates for the benchmarks: a root, an intermediate and leaves, made with cryptography.

Kept apart from ``tests/certfactory.py`` so that the benchmarks do not import the test tree. Each
rotation gets a fresh leaf (new key, new serial), generated before any timing starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SERVER_NAME", "Issuer", "KeyType", "LeafPair", "new_hierarchy"]

KeyType = Literal["p256", "rsa2048"]
SERVER_NAME = "redis.example"
_SANS: list[x509.GeneralName] = [
    x509.DNSName(SERVER_NAME),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


def _new_key(key_type: KeyType) -> CertificateIssuerPrivateKeyTypes:
    if key_type == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not ca,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass(frozen=True)
class LeafPair:
    """A leaf, its key and its issuers: what one rotation uploads."""

    full_chain_pem: str  # leaf, intermediate, root
    chain_pem: str  # leaf, intermediate: what a server sends
    key_pem: str
    fingerprint: str  # SHA-256 of the DER leaf, hex


@dataclass(frozen=True)
class Issuer:
    """A CA that issues leaves; ``chain`` is its own certificate up to the root."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    chain: tuple[x509.Certificate, ...]
    key_type: KeyType
    now: dt.datetime

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @property
    def root_pem(self) -> str:
        return _pem(self.root)

    def _builder(
        self, subject: str, public: CertificateIssuerPrivateKeyTypes, days: int
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(hours=1))
            .not_valid_after(self.now + dt.timedelta(days=days))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def intermediate(self, common_name: str) -> Issuer:
        key = _new_key(self.key_type)
        cert = (
            self._builder(common_name, key, 1825)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return Issuer(cert, key, (cert, *self.chain), self.key_type, self.now)

    def issue(self) -> LeafPair:
        """A serverAuth leaf for ``redis.example`` and 127.0.0.1 with a fresh key."""
        key = _new_key(self.key_type)
        cert = (
            self._builder(SERVER_NAME, key, 90)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_SANS), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return LeafPair(
            full_chain_pem="".join(_pem(c) for c in (cert, *self.chain)),
            chain_pem="".join(_pem(c) for c in (cert, *self.chain[:-1])),
            key_pem=key_pem,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        )


def new_hierarchy(key_type: KeyType = "p256", now: dt.datetime | None = None) -> Issuer:
    """A fresh root and intermediate of ``key_type``; returns the intermediate."""
    now = now or dt.datetime.now(dt.UTC)
    key = _new_key(key_type)
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"clustercert bench root {key_type}")]
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issuer(root, key, (root,), key_type, now).intermediate(
        f"clustercert bench intermediate {key_type}"
    )
