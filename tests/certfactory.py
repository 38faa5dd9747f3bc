"""A small certificate factory for tests, in the spirit of trustme.

Unlike trustme, SAN and EKU are *not* marked critical (strict validators reject critical SANs on
certificates with a subject). Everything is real: keys, signatures, DER.

    ca = CA.new()                                  # self-signed root, ECDSA P-256
    inter = ca.intermediate("Test Intermediate")   # a CA issued by ``ca``
    leaf = inter.issue("db.example", sans=["db.example", "10.0.0.1"])
    leaf.chain_pem      # leaf + intermediates (no root), what an operator uploads
    leaf.key_pem        # PKCS#8; leaf.key_pem_as("pkcs1" | "sec1" | "encrypted" | ...)
    leaf.fingerprint    # SHA-256 hex of the DER leaf

Every validity defaults to a window around ``now``, which is the real clock unless given
(``CA.new(now=T0)`` pins a whole hierarchy: intermediates and leaves inherit it). SHA-1 and MD5
signatures, which cryptography no longer produces, are made by re-signing the TBS bytes.

:func:`openssl_ca_and_leaf` makes a CA and a leaf with the ``openssl`` command line instead, for
tests that must use certificates not made by this library.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA",
    "Leaf",
    "OpenSSLPair",
    "PrivateKey",
    "cert_pem",
    "key_pem",
    "new_key",
    "openssl_ca_and_leaf",
    "self_signed",
]

UTC = dt.UTC

PrivateKey = CertificateIssuerPrivateKeyTypes
KeyType = str
"""``"rsa2048"`` (any size: ``"rsa1024"``, ``"rsa4096"``), ``"ec256"``/``"p256"``, ``"p384"``,
``"p521"``, ``"secp256k1"``, ``"ed25519"``, ``"ed448"``, ``"dsa2048"`` (any size)."""

SignatureHash = Literal["sha256", "sha384", "sha512", "sha1", "md5"]

EKU_NAMES: dict[str, x509.ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "anyExtendedKeyUsage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
}

_CURVES: dict[str, ec.EllipticCurve] = {
    "ec256": ec.SECP256R1(),
    "p256": ec.SECP256R1(),
    "p384": ec.SECP384R1(),
    "p521": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}

# RSA keys are slow to make; tests ask for the same sizes over and over, and a shared key is as
# good as a fresh one for everything these tests check (keys are never compared across certs
# unless a test asks for a mismatch, which uses two different key types or ``fresh=True``).
_RSA_CACHE: dict[int, rsa.RSAPrivateKey] = {}


def new_key(key_type: KeyType = "ec256", *, fresh: bool = False) -> PrivateKey:
    """A private key of ``key_type`` (see :data:`KeyType`)."""
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type])
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if key_type.startswith("rsa"):
        bits = int(key_type[3:])
        if fresh:
            return rsa.generate_private_key(65537, bits)
        if bits not in _RSA_CACHE:
            _RSA_CACHE[bits] = rsa.generate_private_key(65537, bits)
        return _RSA_CACHE[bits]
    if key_type.startswith("dsa"):
        return dsa.generate_private_key(int(key_type[3:]))
    raise ValueError(f"unknown key type {key_type!r}")


def _name(common_name: str | None, organization: str | None = "clustercert tests") -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _general_name(san: str) -> x509.GeneralName:
    if san.startswith("email:"):
        return x509.RFC822Name(san.removeprefix("email:"))
    if san.startswith("URI:"):
        return x509.UniformResourceIdentifier(san.removeprefix("URI:"))
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _eku(usage: str) -> x509.ObjectIdentifier:
    return EKU_NAMES.get(usage) or x509.ObjectIdentifier(usage)


KeyUsageKnob = bool | Sequence[str]
"""``True``: the usual keyUsage (digitalSignature plus keyEncipherment for a leaf, keyCertSign
and cRLSign for a CA); ``False``: no keyUsage extension; a sequence of RFC 5280 names
(``"digitalSignature"``, ``"nonRepudiation"``, ``"keyEncipherment"``, ``"dataEncipherment"``,
``"keyAgreement"``, ``"keyCertSign"``, ``"cRLSign"``): exactly those bits, critical."""

_KEY_USAGE_FIELDS = {
    "digitalSignature": "digital_signature",
    "nonRepudiation": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
}


def _key_usage(knob: Sequence[str] | None, *, ca: bool) -> x509.KeyUsage:
    if knob is None:
        knob = ["digitalSignature", "keyCertSign", "cRLSign"] if ca else [
            "digitalSignature", "keyEncipherment"]  # fmt: skip
    unknown = set(knob) - set(_KEY_USAGE_FIELDS)
    if unknown:
        raise ValueError(f"unknown keyUsage names {sorted(unknown)}")
    bits = {field: name in knob for name, field in _KEY_USAGE_FIELDS.items()}
    return x509.KeyUsage(**bits, encipher_only=False, decipher_only=False)


def _add_key_usage(
    builder: x509.CertificateBuilder, knob: KeyUsageKnob, *, ca: bool
) -> x509.CertificateBuilder:
    if knob is False:
        return builder
    return builder.add_extension(_key_usage(None if knob is True else knob, ca=ca), critical=True)


# --- SHA-1 / MD5 signatures -----------------------------------------------------------------
# cryptography refuses to sign with SHA-1 or MD5, so build the certificate with SHA-256, swap the
# signature AlgorithmIdentifier inside the TBS, and sign the new TBS with the legacy hash.

_LEGACY_SIG_OIDS = {
    ("rsa", "sha1"): "1.2.840.113549.1.1.5",
    ("rsa", "md5"): "1.2.840.113549.1.1.4",
    ("ec", "sha1"): "1.2.840.10045.4.1",
    ("dsa", "sha1"): "1.2.840.10040.4.3",
}


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_children(der: bytes) -> list[bytes]:
    """The raw TLVs inside the outermost element of ``der``."""

    def header(buf: bytes, pos: int) -> tuple[int, int]:
        length = buf[pos + 1]
        if length < 0x80:
            return pos + 2, length
        count = length & 0x7F
        return pos + 2 + count, int.from_bytes(buf[pos + 2 : pos + 2 + count], "big")

    start, length = header(der, 0)
    children, pos = [], start
    while pos < start + length:
        body_start, body_len = header(der, pos)
        children.append(der[pos : body_start + body_len])
        pos = body_start + body_len
    return children


def _der_integer(value: int) -> bytes:
    size = max(1, (value.bit_length() + 8) // 8)  # room for the sign bit
    return _der(0x02, value.to_bytes(size, "big", signed=True))


def _resign(
    cert: x509.Certificate,
    issuer_key: PrivateKey,
    digest: SignatureHash,
    *,
    serial: int | None = None,
) -> x509.Certificate:
    """Re-sign ``cert`` with ``digest``, optionally replacing its serial number (even by 0 or a
    negative one, which cryptography's builder refuses)."""
    tbs_children = _der_children(cert.tbs_certificate_bytes)
    version = 1 if tbs_children[0][0] == 0xA0 else 0
    if serial is not None:
        tbs_children[version] = _der_integer(serial)
    algorithm = _der_children(cert.public_bytes(serialization.Encoding.DER))[1]
    if digest in ("sha1", "md5"):
        family = (
            "rsa"
            if isinstance(issuer_key, rsa.RSAPrivateKey)
            else "ec"
            if isinstance(issuer_key, ec.EllipticCurvePrivateKey)
            else "dsa"
            if isinstance(issuer_key, dsa.DSAPrivateKey)
            else None
        )
        if family is None or (family, digest) not in _LEGACY_SIG_OIDS:
            raise ValueError(f"cannot sign with {digest} using {type(issuer_key).__name__}")
        oid = _der_oid(_LEGACY_SIG_OIDS[(family, digest)])
        algorithm = _der(0x30, oid + (b"\x05\x00" if family == "rsa" else b""))
    tbs_children[version + 1] = algorithm
    tbs = _der(0x30, b"".join(tbs_children))
    # Deliberately weak when asked: these certificates exist to be rejected.
    hash_algorithm: hashes.HashAlgorithm = {
        "sha1": hashes.SHA1(),  # noqa: S303
        "md5": hashes.MD5(),  # noqa: S303
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }[digest]
    if isinstance(issuer_key, rsa.RSAPrivateKey):
        signature = issuer_key.sign(tbs, padding.PKCS1v15(), hash_algorithm)
    elif isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        signature = issuer_key.sign(tbs, ec.ECDSA(hash_algorithm))
    elif isinstance(issuer_key, dsa.DSAPrivateKey):
        signature = issuer_key.sign(tbs, hash_algorithm)
    else:
        signature = issuer_key.sign(tbs)
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    with warnings.catch_warnings():
        # A non-positive serial is the point of some of these certificates.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_der_x509_certificate(der)


def _sign(
    builder: x509.CertificateBuilder,
    issuer_key: PrivateKey,
    digest: SignatureHash,
    serial: int | None = None,
) -> x509.Certificate:
    if serial is not None and serial > 0:
        builder = builder.serial_number(serial)
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        cert = builder.sign(issuer_key, None)
    elif digest == "sha384":
        cert = builder.sign(issuer_key, hashes.SHA384())
    elif digest == "sha512":
        cert = builder.sign(issuer_key, hashes.SHA512())
    else:
        cert = builder.sign(issuer_key, hashes.SHA256())
    if digest in ("sha1", "md5") or (serial is not None and serial <= 0):
        return _resign(cert, issuer_key, digest, serial=serial)
    return cert


# --- PEM ---------------------------------------------------------------------------------------


def cert_pem(*certs: x509.Certificate) -> str:
    """PEM of ``certs`` in the order given."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


KeyFormat = Literal["pkcs8", "pkcs1", "sec1", "encrypted", "legacy-encrypted", "der"]


def key_pem(key: PrivateKey, fmt: KeyFormat = "pkcs8", *, password: bytes = b"password1") -> str:
    """``key`` serialised as ``fmt``.

    ``pkcs1`` (RSA) and ``sec1`` (EC) are OpenSSL's traditional formats (``RSA PRIVATE KEY``,
    ``EC PRIVATE KEY``); ``encrypted`` is encrypted PKCS#8; ``legacy-encrypted`` is the
    traditional format with ``Proc-Type: 4,ENCRYPTED`` headers. ``der`` returns PKCS#8 DER
    decoded as latin-1 (binary garbage as far as a PEM parser is concerned).
    """
    enc = serialization.Encoding
    pf = serialization.PrivateFormat
    none = serialization.NoEncryption()
    if fmt == "pkcs8":
        return key.private_bytes(enc.PEM, pf.PKCS8, none).decode("ascii")
    if fmt in ("pkcs1", "sec1"):
        return key.private_bytes(enc.PEM, pf.TraditionalOpenSSL, none).decode("ascii")
    if fmt == "encrypted":
        secret = serialization.BestAvailableEncryption(password)
        return key.private_bytes(enc.PEM, pf.PKCS8, secret).decode("ascii")
    if fmt == "legacy-encrypted":
        secret = serialization.BestAvailableEncryption(password)
        return key.private_bytes(enc.PEM, pf.TraditionalOpenSSL, secret).decode("ascii")
    if fmt == "der":
        return key.private_bytes(enc.DER, pf.PKCS8, none).decode("latin-1")
    raise ValueError(f"unknown key format {fmt!r}")


# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """An end-entity certificate, its key, and the issuers above it (nearest first, root last)."""

    cert: x509.Certificate
    key: PrivateKey
    issuers: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> str:
        """The leaf alone."""
        return cert_pem(self.cert)

    @property
    def chain_pem(self) -> str:
        """Leaf then intermediates, without the root: what a server sends."""
        return cert_pem(self.cert, *self.issuers[:-1])

    @property
    def full_chain_pem(self) -> str:
        """Leaf, intermediates and the root."""
        return cert_pem(self.cert, *self.issuers)

    @property
    def key_pem(self) -> str:
        """The key as unencrypted PKCS#8 PEM."""
        return key_pem(self.key)

    def key_pem_as(self, fmt: KeyFormat, *, password: bytes = b"password1") -> str:
        return key_pem(self.key, fmt, password=password)

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def pkcs12(self, password: bytes | None = None) -> bytes:
        """The leaf, its key and its issuers as a PKCS#12 file."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return pkcs12.serialize_key_and_certificates(
            b"leaf",
            self.key,  # type: ignore[arg-type]
            self.cert,
            list(self.issuers) or None,
            encryption,
        )

    def write(self, directory: Path, stem: str = "leaf") -> tuple[Path, Path]:
        """Write ``<stem>.pem`` (chain) and ``<stem>.key`` into ``directory``."""
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_text(self.chain_pem)
        key_path.write_text(self.key_pem)
        return cert_path, key_path


def _default_window(
    now: dt.datetime,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    days: int,
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else now - dt.timedelta(days=1)
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    return start, end


@dataclass(frozen=True)
class CA:
    """A certificate authority: a root (``parent is None``) or an intermediate."""

    cert: x509.Certificate
    key: PrivateKey
    now: dt.datetime
    parent: CA | None = field(default=None, repr=False)

    @classmethod
    def new(
        cls,
        common_name: str = "clustercert Test Root CA",
        *,
        key_type: KeyType = "ec256",
        now: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        path_length: int | None = None,
        basic_constraints: bool = True,
        key_usage: KeyUsageKnob = True,
        signature_hash: SignatureHash = "sha256",
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> CA:
        """A self-signed root CA. ``now`` (default: the real clock) pins the hierarchy's time."""
        now = now or dt.datetime.now(UTC)
        key = new_key(key_type)
        name = _name(common_name)
        start, end = _default_window(now, not_before, not_after, 3650)
        builder = cls._ca_builder(
            name, name, key, key, start, end, path_length, basic_constraints, key_usage, extensions
        )
        return cls(_sign(builder, key, signature_hash), key, now)

    @staticmethod
    def _ca_builder(
        subject: x509.Name,
        issuer: x509.Name,
        key: PrivateKey,
        issuer_key: PrivateKey,
        start: dt.datetime,
        end: dt.datetime,
        path_length: int | None,
        basic_constraints: bool,
        key_usage: KeyUsageKnob,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
    ) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if key is not issuer_key:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        if basic_constraints:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=path_length), critical=True
            )
        builder = _add_key_usage(builder, key_usage, ca=True)
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder

    def intermediate(
        self,
        common_name: str = "clustercert Test Intermediate CA",
        *,
        key_type: KeyType = "ec256",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        path_length: int | None = None,
        basic_constraints: bool = True,
        key_usage: KeyUsageKnob = True,
        signature_hash: SignatureHash = "sha256",
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> CA:
        """A CA issued by this one."""
        key = new_key(key_type)
        start, end = _default_window(self.now, not_before, not_after, 1825)
        builder = self._ca_builder(
            _name(common_name),
            self.cert.subject,
            key,
            self.key,
            start,
            end,
            path_length,
            basic_constraints,
            key_usage,
            extensions,
        )
        return CA(_sign(builder, self.key, signature_hash), key, self.now, self)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate, then its issuers up to the root."""
        return (self.cert, *(self.parent.chain if self.parent else ()))

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    def issue(
        self,
        common_name: str | None = "leaf.example",
        *,
        sans: Sequence[str] | None = None,
        eku: Sequence[str] | None = ("serverAuth", "clientAuth"),
        key_type: KeyType = "ec256",
        key: PrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        is_ca: bool | None = False,
        key_usage: KeyUsageKnob = True,
        signature_hash: SignatureHash = "sha256",
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
        serial: int | None = None,
    ) -> Leaf:
        """Issue a leaf.

        ``sans`` defaults to ``[common_name]``; ``[]`` leaves the SAN extension out; entries are
        DNS names, IP addresses, ``email:...`` or ``URI:...``. ``eku=None`` leaves the EKU
        extension out. ``is_ca=None`` leaves basicConstraints out. ``key`` reuses a key.
        ``serial`` may be 0 or negative (non-conforming, for parser tests).
        """
        key = key or new_key(key_type)
        builder = _leaf_builder(
            _name(common_name, None),
            self.cert.subject,
            key,
            self.key,
            *_default_window(self.now, not_before, not_after, 365),
            sans=[common_name] if sans is None and common_name else (sans or []),
            eku=eku,
            is_ca=is_ca,
            key_usage=key_usage,
            extensions=extensions,
        )
        return Leaf(_sign(builder, self.key, signature_hash, serial), key, self.chain)


def _leaf_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    issuer_key: PrivateKey,
    start: dt.datetime,
    end: dt.datetime,
    *,
    sans: Sequence[str],
    eku: Iterable[str] | None,
    is_ca: bool | None,
    key_usage: KeyUsageKnob,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.CertificateBuilder:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if key is not issuer_key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if is_ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=None), critical=True
        )
    builder = _add_key_usage(builder, key_usage, ca=bool(is_ca))
    if eku is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([_eku(u) for u in eku]), critical=False
        )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder


def self_signed(
    common_name: str = "self-signed.example",
    *,
    sans: Sequence[str] | None = None,
    eku: Sequence[str] | None = ("serverAuth", "clientAuth"),
    key_type: KeyType = "ec256",
    now: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    is_ca: bool | None = False,
    signature_hash: SignatureHash = "sha256",
) -> Leaf:
    """A self-signed leaf (its own root). ``is_ca=True`` makes it a CA certificate."""
    now = now or dt.datetime.now(UTC)
    key = new_key(key_type)
    name = _name(common_name)
    builder = _leaf_builder(
        name,
        name,
        key,
        key,
        *_default_window(now, not_before, not_after, 365),
        sans=[common_name] if sans is None else sans,
        eku=eku,
        is_ca=is_ca,
        key_usage=True,
        extensions=(),
    )
    return Leaf(_sign(builder, key, signature_hash), key, ())


# --- the openssl command line ------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSSLPair:
    """Files written by :func:`openssl_ca_and_leaf` (all PEM)."""

    ca_cert: Path
    ca_key: Path
    leaf_cert: Path
    leaf_key: Path

    @property
    def chain(self) -> str:
        """Leaf then CA."""
        return self.leaf_cert.read_text() + self.ca_cert.read_text()


def openssl(*args: str, cwd: Path) -> None:
    """Run ``openssl`` with ``args`` in ``cwd``; raise with its stderr if it fails."""
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def openssl_ca_and_leaf(
    directory: Path,
    *,
    common_name: str = "leaf.example",
    sans: Sequence[str] = ("leaf.example", "127.0.0.1"),
    key: Literal["rsa", "ec"] = "ec",
    eku: str | None = "serverAuth,clientAuth",
    days: int = 30,
    ca_key_usage: bool = True,
    leaf_key_usage: str = "critical,digitalSignature",
) -> OpenSSLPair:
    """Make a CA and a leaf it issued with the ``openssl`` CLI, in ``directory``.

    The leaf has ``basicConstraints=CA:FALSE``, the SANs given, and ``extendedKeyUsage=eku``
    (none when ``eku`` is None). Validity starts now (openssl reads the real clock).
    ``ca_key_usage=False`` leaves keyUsage off the CA, as ``openssl req -x509`` does by default.
    ``leaf_key_usage`` is the leaf's keyUsage in openssl's config syntax.
    """
    ca_usage = ["-addext", "keyUsage=critical,keyCertSign,cRLSign"] if ca_key_usage else []
    newkey = "rsa:2048" if key == "rsa" else "ec"
    keyopts = [] if key == "rsa" else ["-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl(
        "req", "-x509", "-newkey", newkey, *keyopts, "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", str(days + 1),
        "-subj", "/O=clustercert tests/CN=OpenSSL Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", *ca_usage,
        cwd=directory,
    )  # fmt: skip
    openssl(
        "req", "-new", "-newkey", newkey, *keyopts, "-nodes", "-keyout", "leaf.key",
        "-out", "leaf.csr", "-subj", f"/CN={common_name}",
        cwd=directory,
    )  # fmt: skip
    san_text = ",".join(f"IP:{s}" if _is_ip(s) else f"DNS:{s}" for s in sans)
    lines = ["basicConstraints=critical,CA:FALSE", f"keyUsage={leaf_key_usage}"]
    if sans:
        lines.append(f"subjectAltName={san_text}")
    if eku:
        lines.append(f"extendedKeyUsage={eku}")
    (directory / "leaf.ext").write_text("\n".join(lines) + "\n")
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", str(days), "-sha256",
        "-extfile", "leaf.ext",
        cwd=directory,
    )  # fmt: skip
    return OpenSSLPair(
        directory / "ca.pem", directory / "ca.key", directory / "leaf.pem", directory / "leaf.key"
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
