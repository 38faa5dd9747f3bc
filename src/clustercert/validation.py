"""Upload validation (DESIGN §5): may this certificate be installed under this name?

:func:`validate_upload` checks one ``{"name", "certificate", "key"}`` upload and either returns a
:class:`ValidatedCertificate` (normalised chain, re-serialised key, warnings) or raises the
*first* failing :class:`~clustercert.errors.CertificateRejected` in DESIGN §4.2's order:

1. parse (PEM only, budgets, key present/absent/encrypted/weak): ``invalid_certificate``,
   ``missing_key``, ``unexpected_key``, ``encrypted_key``, ``weak_key``
2. key match: ``key_values_mismatch``
3. expiry: ``certificate_expired`` (406)
4. not yet valid (5 minutes of clock skew tolerated): ``not_yet_valid``
5. chain completion: ``issuer_not_found`` (404), or ``chain_invalid`` for unrelated extras
6. chain signatures and CA rules: ``chain_invalid``, ``not_a_ca``, ``issuer_key_usage``
7. policy: ``leaf_is_ca``, ``missing_extended_key_usage``, ``key_usage_mismatch``,
   ``insecure_signature``, ``weak_key`` (certificate keys), then RFC 5280 conformance
   (``chain_invalid``)
8. the client's-eye check: a real in-memory TLS handshake as the name's clients (or servers)
   verify it (:mod:`clustercert.handshake`): ``rejected_by_tls_client``

:func:`validate_all` runs every item of a batch and reports all failures in one error.
The validation time is always a parameter; nothing here reads the clock. The rules, budgets
and corpus results are documented in ``docs/validation.md``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from clustercert import handshake, pki
from clustercert.clock import iso
from clustercert.errors import (
    CertificateExpired,
    CertificateRejected,
    ChainInvalid,
    ClusterCertError,
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
from clustercert.names import CLIENT_AUTH, SERVER_AUTH, CertificateName, lookup

__all__ = [
    "CLOCK_SKEW",
    "EXPIRY_WARNING",
    "MAX_CHAIN_LENGTH",
    "MAX_NAME_ATTRIBUTES",
    "MAX_SANS",
    "BatchIssuerNotFound",
    "TrustStore",
    "UploadItem",
    "ValidatedCertificate",
    "validate_all",
    "validate_upload",
]

CLOCK_SKEW = dt.timedelta(minutes=5)
"""A notBefore up to this far after the validation time is accepted (clock skew between hosts)."""

EXPIRY_WARNING = dt.timedelta(days=30)
"""A chain certificate expiring within this window is accepted with a warning."""

MAX_CHAIN_LENGTH = 10
"""Leaf + up to 8 intermediates + root; cryptography's verifier allows 8 intermediates too."""

MAX_SANS = 20_000
"""subjectAltName entries per certificate (badssl.com serves a 10,000-SAN certificate)."""

MAX_NAME_ATTRIBUTES = 64
"""Attributes in a subject or issuer name (real names have about ten; thousands are an attack)."""

_MAX_PATH_STEPS = 4_096
"""Nodes the chain builder may visit: bounds the work on adversarial, branching uploads."""

_MIN_RSA_BITS = 2048
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_KEY_ADVICE = (
    "use RSA (2048 bits or more), ECDSA P-256/P-384/P-521, Ed25519 or Ed448, e.g. "
    "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem, "
    "and have the certificate reissued for the new key"
)

# Signature algorithms cryptography's verifier checks (the web PKI set). Chains that use others
# (Ed25519/Ed448/DSA issuers) get our checks only; see _check_conformance.
_VERIFIER_SIGNATURE_OIDS = frozenset(
    {
        "1.2.840.113549.1.1.11",  # sha256WithRSAEncryption
        "1.2.840.113549.1.1.12",  # sha384WithRSAEncryption
        "1.2.840.113549.1.1.13",  # sha512WithRSAEncryption
        "1.2.840.113549.1.1.10",  # RSASSA-PSS
        "1.2.840.10045.4.3.2",  # ecdsa-with-SHA256
        "1.2.840.10045.4.3.3",  # ecdsa-with-SHA384
        "1.2.840.10045.4.3.4",  # ecdsa-with-SHA512
    }
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
_EKU_OIDS = {name: oid for oid, name in _EKU_NAMES.items()}


# --- trust -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustStore:
    """The CA certificates a chain may end in without being uploaded (trust anchors).

    Every certificate here is an anchor, self-signed or not: the internal CA, the system bundle,
    operator-configured extra CAs. Immutable; lookups by subject name are indexed.
    """

    roots: tuple[x509.Certificate, ...]
    _by_subject: Mapping[x509.Name, tuple[x509.Certificate, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        index: dict[x509.Name, list[x509.Certificate]] = {}
        for root in self.roots:
            if _extensions_parse(root):
                index.setdefault(root.subject, []).append(root)
        object.__setattr__(self, "_by_subject", {k: tuple(v) for k, v in index.items()})

    @classmethod
    def system(cls, extra: Sequence[x509.Certificate] = ()) -> TrustStore:
        """The operating system's CA bundle plus ``extra``. A missing bundle means no roots."""
        return cls((*_system_roots(), *extra))

    @classmethod
    def of(cls, roots: Sequence[x509.Certificate]) -> TrustStore:
        """Exactly ``roots``."""
        return cls(tuple(roots))

    def with_extra(self, extra: Sequence[x509.Certificate]) -> TrustStore:
        """This store plus ``extra``."""
        return TrustStore((*self.roots, *extra))

    def issuers_named(self, name: x509.Name) -> tuple[x509.Certificate, ...]:
        """Anchors whose subject is ``name``."""
        return self._by_subject.get(name, ())


def _extensions_parse(cert: x509.Certificate) -> bool:
    """Whether ``cert``'s extensions parse: an anchor whose do not can never be used."""
    with pki.recorded_warnings():  # cryptography caches the parse: no warning later
        try:
            for ext in cert.extensions:
                _ = ext.value
        except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            return False
    return True


_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSDs
)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@functools.cache
def _system_roots() -> tuple[x509.Certificate, ...]:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *_SYSTEM_BUNDLES):
        if candidate and Path(candidate).is_file():
            data = Path(candidate).read_bytes()
            break
    else:
        return ()
    roots = []
    # Some system roots have non-positive serial numbers, which cryptography warns about; they
    # are still the operator's trusted roots.
    with pki.recorded_warnings():
        for match in _PEM_CERT.finditer(data):
            try:
                roots.append(x509.load_pem_x509_certificate(match.group(0)))
            except ValueError:
                continue
    return tuple(roots)


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidatedCertificate:
    """An upload that passed every check, normalised.

    ``chain`` is leaf first, then its issuers in order; the root is included only if it was
    uploaded. For a CA bundle (``mtls_trusted_ca``) it is the bundle in upload order, and
    ``not_before``/``not_after`` are the window in which *every* certificate is valid.
    ``key_pem`` is the key re-serialised as unencrypted PKCS#8 (None for names without a key).
    """

    name: str
    chain: tuple[x509.Certificate, ...]
    chain_pem: str
    key_pem: str | None
    fingerprint_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    warnings: tuple[str, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def summary(self) -> dict[str, object]:
        """Metadata for APIs and the CLI; never key material."""
        public = self.leaf.public_key()
        return {
            "subject": self.leaf.subject.rfc4514_string(),
            "issuer": self.leaf.issuer.rfc4514_string(),
            "sans": pki.subject_alt_names(self.leaf),
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "fingerprint_sha256": self.fingerprint_sha256,
            "key_type": pki.describe_key(public),
            "key_bits": pki.key_bits(public),
            "chain_length": len(self.chain),
        }


@dataclass(frozen=True)
class UploadItem:
    """One item of ``PUT /v1/cluster/certificates``."""

    name: str
    certificate: str
    key: str | None = None


class BatchIssuerNotFound(IssuerNotFound):
    """``issuer_not_found`` as the first failure of a batch: DESIGN §4.2 answers 400 there.

    Still an :class:`IssuerNotFound` (same ``error_code``); only ``http_status`` differs, so a
    handler that reads ``http_status`` answers correctly without knowing about batches.
    """

    http_status = 400


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- entry points ------------------------------------------------------------------------------


def validate_upload(
    name: str,
    certificate: str,
    key: str | None,
    *,
    at: dt.datetime,
    trust: TrustStore,
) -> ValidatedCertificate:
    """Validate one upload at time ``at`` (timezone-aware) against ``trust``.

    Raises :class:`UnknownCertificate` for a name outside DESIGN §3, otherwise the first failing
    :class:`CertificateRejected` subclass in the order given in the module docstring. An empty
    ``key`` counts as no key. ``ValueError`` for a naive ``at`` (a programming error).
    """
    row = lookup(name)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("the validation time must be timezone-aware")
    # X.509 times have whole seconds; compare at that granularity (a notAfter of 12:00:00
    # covers all of that second).
    at = at.astimezone(dt.UTC).replace(microsecond=0)
    upload = _Upload.parse(row, certificate, key)
    if row.ca_bundle:
        return _validate_bundle(upload, at, trust)
    return _validate_chain(upload, at, trust)


def validate_all(
    items: Sequence[UploadItem], *, at: dt.datetime, trust: TrustStore
) -> list[ValidatedCertificate]:
    """Validate every item; return them all, in order, or raise one error for the batch.

    Every item is validated, even after a failure. If any fails, the raised error is an instance
    of the first failing item's class (so its ``error_code`` and ``http_status``), except that
    ``issuer_not_found`` becomes :class:`BatchIssuerNotFound` (400, DESIGN §4.2). Its ``errors``
    lists each failing item as ``{"name", "error_code", "description", "index"}`` (index is
    0-based in request order). A name given twice fails the later item with ``invalid_schema``.
    """
    results: list[ValidatedCertificate] = []
    failures: list[tuple[int, str, ClusterCertError]] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            if item.name in first_index:
                raise InvalidSchema(
                    f"certificate name {item.name!r} appears more than once (items "
                    f"{first_index[item.name]} and {index}); send each name once"
                )
            first_index[item.name] = index
            results.append(
                validate_upload(item.name, item.certificate, item.key, at=at, trust=trust)
            )
        except (CertificateRejected, UnknownCertificate, InvalidSchema) as exc:
            failures.append((index, item.name, exc))
    if not failures:
        return results
    index, name, first = failures[0]
    errors = [
        {"name": n, "error_code": e.error_code, "description": e.description, "index": i}
        for i, n, e in failures
    ]
    where = f"certificate {name!r} (item {index})"
    description = (
        f"{where}: {first.description}"
        if len(failures) == 1
        else f"{len(failures)} of {len(items)} certificates failed validation, nothing was "
        f"changed; the first, {where}: {first.description}"
    )
    error_class = BatchIssuerNotFound if isinstance(first, IssuerNotFound) else type(first)
    raise error_class(description, errors=errors)


# --- step 1: parse -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Upload:
    row: CertificateName
    certs: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes | None
    notes: tuple[str, ...]

    @classmethod
    def parse(cls, row: CertificateName, certificate: str, key: str | None) -> _Upload:
        parsed = pki.load_certificates(certificate)
        _check_text_around_pem(certificate, "certificate")
        notes = list(parsed.notes)
        certs: list[x509.Certificate] = []
        for cert in parsed.certificates:
            if cert in certs:
                notes.append(
                    f"certificate {pki.describe_name(cert.subject)} was uploaded twice; the "
                    f"copy was dropped"
                )
                continue
            certs.append(cert)
        if not row.ca_bundle and len(certs) > MAX_CHAIN_LENGTH:
            raise InvalidCertificate(
                f"the upload holds {len(certs)} certificates; a chain has at most "
                f"{MAX_CHAIN_LENGTH} (leaf, intermediates, root)"
            )
        for cert in certs:
            attributes = max(len(list(cert.subject)), len(list(cert.issuer)))
            if attributes > MAX_NAME_ATTRIBUTES:
                raise InvalidCertificate(
                    f"a certificate's subject or issuer name has {attributes} attributes; at "
                    f"most {MAX_NAME_ATTRIBUTES} are accepted"
                )
            sans = pki.san_count(cert)
            if sans > MAX_SANS:
                raise InvalidCertificate(
                    f"certificate {pki.describe_name(cert.subject)} lists {sans} "
                    f"subjectAltNames; at most {MAX_SANS} are accepted"
                )
        return cls(row, tuple(certs), _parse_key(row, key), tuple(notes))


# Characters that are not text: C0 controls but tab and line ends, DEL, C1 controls, surrogates
# (the CLI reads files as UTF-8 with surrogateescape: an undecodable byte b is U+DC00+b),
# U+FFFD (what a decoder left where bytes were not text) and the noncharacters U+FFFE/U+FFFF.
_BINARY = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd\ufffe\uffff]")


def _check_text_around_pem(text: str, field: str) -> None:
    """Text around PEM blocks is ignored; binary bytes are not text, but a damaged file or a
    binary file glued to a PEM one. Called after the blocks parsed, so a match lies outside
    them."""
    found = _BINARY.search(text)
    if found is None:
        return
    char = found.group(0)
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        what = f"byte 0x{code - 0xDC00:02X}, which is not UTF-8 text,"
    elif code == 0xFFFD:
        what = (
            "U+FFFD (the replacement character a decoder leaves where bytes were not text, "
            "such as 0xFF)"
        )
    elif code < 0x80:
        what = f"byte 0x{code:02X}{' (NUL)' if code == 0 else ''}"
    else:
        what = f"the non-text character U+{code:04X}"
    prefix = text[: found.start()]
    try:
        offset = len(prefix.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate the CLI cannot have made: count characters
        offset = len(prefix)
    ends = prefix.count("-----END ")
    where = f"after the END line of PEM block {ends}" if ends else "before the first PEM block"
    raise InvalidCertificate(
        f"the {field} field holds binary data outside its PEM blocks: {what} at byte offset "
        f"{offset}, {where}; text around PEM blocks is allowed, binary data is not (a damaged "
        f"file, or a binary file appended to the PEM one): upload only the PEM text"
    )


def _parse_key(row: CertificateName, key: str | None) -> PrivateKeyTypes | None:
    present = key is not None and key.strip() != ""
    if not row.has_key:
        if present:
            raise UnexpectedKey(
                f"{row.name!r} ({row.secures}) takes no private key: send the certificate "
                f"only, without the key field"
            )
        return None
    if not present or key is None:
        raise MissingKey(
            f"{row.name!r} ({row.secures}) needs the private key of the leaf certificate in "
            f"the key field (PEM: PKCS#8, PKCS#1 or SEC1, unencrypted)"
        )
    private = pki.load_private_key(key)
    _check_text_around_pem(key, "key")
    _check_key_strength(private.public_key(), "the uploaded private key")
    return private


def _check_key_strength(public: PublicKeyTypes, what: str) -> None:
    """Raise :class:`WeakKey` unless ``public`` is a key type and size we accept."""
    if isinstance(public, rsa.RSAPublicKey):
        bits = public.key_size
        if bits < _MIN_RSA_BITS:
            raise WeakKey(f"{what} is RSA-{bits}, which is too weak; {_KEY_ADVICE}")
        if bits % 8:
            raise WeakKey(f"{what} is RSA-{bits}, not a whole number of bytes; {_KEY_ADVICE}")
        return
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in _CURVES:
            raise WeakKey(
                f"{what} uses the elliptic curve {public.curve.name}, which is not accepted; "
                f"{_KEY_ADVICE}"
            )
        return
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return
    if isinstance(public, dsa.DSAPublicKey):
        raise WeakKey(
            f"{what} is DSA-{public.key_size}; DSA is not accepted (TLS 1.3 has no DSA and "
            f"TLS 1.2 clients rarely offer it); {_KEY_ADVICE}"
        )
    raise WeakKey(f"{what} is {pki.describe_key(public)}, which cannot sign; {_KEY_ADVICE}")


# --- the chain graph ---------------------------------------------------------------------------


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


@dataclass(frozen=True)
class _Graph:
    """Who issued whom among the uploaded certificates (by name *and* signature)."""

    certs: tuple[x509.Certificate, ...]
    issuers: tuple[tuple[int, ...], ...]  # issuers[i]: indexes of the certs that issued certs[i]
    self_signed: tuple[bool, ...]

    @classmethod
    def of(cls, certs: tuple[x509.Certificate, ...]) -> _Graph:
        issuers = tuple(
            tuple(
                j
                for j, candidate in enumerate(certs)
                if j != i and pki.is_issued_by(cert, candidate)
            )
            for i, cert in enumerate(certs)
        )
        return cls(certs, issuers, tuple(pki.is_self_signed(c) for c in certs))

    def leaf_index(self, key: PrivateKeyTypes | None) -> int:
        """The leaf: a certificate that issued no other uploaded one, preferring the key's."""
        issued_something = {j for row in self.issuers for j in row}
        candidates = [i for i in range(len(self.certs)) if i not in issued_something]
        if key is not None:
            spki = _spki(key.public_key())
            matching = [i for i in candidates if _spki(self.certs[i].public_key()) == spki]
            if matching:
                return matching[0]
        return candidates[0] if candidates else 0


def _role(cert: x509.Certificate, leaf: x509.Certificate) -> str:
    if cert is leaf:
        return f"the leaf {pki.describe_name(cert.subject)}"
    return f"certificate {pki.describe_name(cert.subject)}"


# --- steps 2-4: key match and validity ---------------------------------------------------------


def _check_key_match(graph: _Graph, leaf: x509.Certificate, key: PrivateKeyTypes) -> None:
    cert_key, upload_key = leaf.public_key(), key.public_key()
    if _spki(cert_key) == _spki(upload_key):
        return
    description = (
        f"the private key does not match the certificate (certificate key: "
        f"{pki.describe_key(cert_key)} {pki.spki_sha256(cert_key)}, uploaded key: "
        f"{pki.describe_key(upload_key)} {pki.spki_sha256(upload_key)})"
    )
    others = [c for c in graph.certs if _spki(c.public_key()) == _spki(upload_key)]
    if others:
        description += (
            f"; the key belongs to {pki.describe_name(others[0].subject)}, which is a CA in "
            f"the chain, not the leaf: upload the leaf's own key"
        )
    else:
        description += "; upload the key the certificate was issued for"
    raise KeyValuesMismatch(description)


def _check_validity(
    certs: Sequence[x509.Certificate], leaf: x509.Certificate, at: dt.datetime
) -> None:
    for cert in certs:
        if cert.not_valid_after_utc < at:
            raise CertificateExpired(
                f"{_role(cert, leaf)} expired on {_when(cert.not_valid_after_utc)} (validation "
                f"time {_when(at)}); {_renew_advice(cert, leaf)}"
            )
    for cert in certs:
        if cert.not_valid_before_utc > at + CLOCK_SKEW:
            raise NotYetValid(
                f"{_role(cert, leaf)} is not valid before {_when(cert.not_valid_before_utc)} "
                f"(validation time {_when(at)}; up to {int(CLOCK_SKEW.total_seconds() // 60)} "
                f"minutes of clock skew are tolerated); upload it once it is valid, or check the "
                f"clock of the host that issued it"
            )


def _renew_advice(cert: x509.Certificate, leaf: x509.Certificate) -> str:
    if cert is leaf:
        return "renew it with your CA and upload the new certificate"
    return "download the current chain from your CA and upload it with the leaf"


def _start_warnings(
    certs: Sequence[x509.Certificate], leaf: x509.Certificate, at: dt.datetime
) -> list[str]:
    """A notBefore after ``at`` but within :data:`CLOCK_SKEW`: accepted, and the operator is told
    from when clients (which check notBefore exactly) accept the chain."""
    latest = max(certs, key=lambda c: c.not_valid_before_utc)
    start = latest.not_valid_before_utc
    if start <= at:
        return []
    ahead = int((start - at).total_seconds())
    return [
        f"{_role(latest, leaf)} is not valid before {_when(start)}, {ahead} s after the "
        f"validation time {_when(at)} (within the {int(CLOCK_SKEW.total_seconds() // 60)}-minute "
        f"clock-skew tolerance): TLS clients will start accepting it at {_when(start)}"
    ]


def _expiry_warnings(
    certs: Sequence[x509.Certificate], leaf: x509.Certificate, at: dt.datetime
) -> list[str]:
    found = []
    for cert in certs:
        left = cert.not_valid_after_utc - at
        if left <= EXPIRY_WARNING:
            days = left.days
            found.append(
                f"{_role(cert, leaf)} expires in {days} day{'s' if days != 1 else ''}, on "
                f"{_when(cert.not_valid_after_utc)}: renew it soon"
            )
    return found


# --- step 5: chain completion ------------------------------------------------------------------


def _usable_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at + CLOCK_SKEW and cert.not_valid_after_utc >= at


@dataclass(frozen=True)
class _Path:
    """Uploaded certificates from the leaf upwards, and the trusted anchor above them if any."""

    indexes: tuple[int, ...]
    anchors: tuple[x509.Certificate, ...]  # trusted issuers of the top one (usable at `at`)
    complete: bool

    @property
    def anchor(self) -> x509.Certificate | None:
        return self.anchors[0] if self.anchors else None


@dataclass(frozen=True)
class _Chain:
    path: tuple[x509.Certificate, ...]
    anchors: tuple[x509.Certificate, ...]  # empty when the path ends in an uploaded root
    alternates: tuple[x509.Certificate, ...]  # cross-signed twins of chain certificates

    @property
    def anchor(self) -> x509.Certificate | None:
        return self.anchors[0] if self.anchors else None


class _ChainBuilder:
    """Depth-first search for a path from the leaf that uses every uploaded certificate.

    Uploads are small (at most :data:`MAX_CHAIN_LENGTH` certificates) and usually linear, but
    cross-signed and adversarial uploads branch, so the search is bounded by
    :data:`_MAX_PATH_STEPS` visited nodes and by :data:`MAX_CHAIN_LENGTH`.
    """

    def __init__(self, graph: _Graph, trust: TrustStore, at: dt.datetime) -> None:
        self.graph, self.trust, self.at = graph, trust, at
        self.steps = 0
        self.best: _Path | None = None

    def build(self, leaf_index: int) -> _Chain:
        found = self._walk((leaf_index,))
        if found is None:
            assert self.best is not None
            raise self.explain(self.best)
        path = tuple(self.graph.certs[i] for i in found.indexes)
        return _Chain(path, found.anchors, self._alternates(found))

    def ending(self, index: int) -> tuple[bool, tuple[x509.Certificate, ...]]:
        """Whether the path may end at ``certs[index]``, and the trusted anchors above it."""
        top = self.graph.certs[index]
        if self.graph.self_signed[index]:
            return True, ()
        anchors = tuple(
            anchor
            for anchor in self.trust.issuers_named(top.issuer)
            if _usable_at(anchor, self.at) and pki.signature_verifies(top, anchor.public_key())
        )
        return bool(anchors), anchors

    def _walk(self, path: tuple[int, ...]) -> _Path | None:
        self.steps += 1
        if self.steps > _MAX_PATH_STEPS:
            raise ChainInvalid(
                f"the uploaded certificates allow too many alternative chains to check (more "
                f"than {_MAX_PATH_STEPS}); upload only the leaf and the one chain it is served "
                f"with"
            )
        complete, anchors = self.ending(path[-1])
        candidate = _Path(path, anchors, complete)
        if complete and not self._unrelated(candidate):
            return candidate
        if self.best is None or (complete, len(path)) > (
            self.best.complete,
            len(self.best.indexes),
        ):
            self.best = candidate
        if self.graph.self_signed[path[-1]] or len(path) >= MAX_CHAIN_LENGTH:
            return None
        for issuer in self.graph.issuers[path[-1]]:
            if issuer not in path:
                found = self._walk((*path, issuer))
                if found is not None:
                    return found
        return None

    def _twins(self, candidate: _Path) -> list[tuple[x509.Name, bytes]]:
        on_chain = [self.graph.certs[i] for i in candidate.indexes]
        if candidate.anchor is not None:
            on_chain.append(candidate.anchor)
        return [(c.subject, _spki(c.public_key())) for c in on_chain]

    def _off_path(self, candidate: _Path) -> list[int]:
        return [i for i in range(len(self.graph.certs)) if i not in candidate.indexes]

    def _unrelated(self, candidate: _Path) -> list[x509.Certificate]:
        """Uploaded certificates off the path that are not a cross-signed twin of one on it."""
        twins = self._twins(candidate)
        return [
            self.graph.certs[i]
            for i in self._off_path(candidate)
            if (self.graph.certs[i].subject, _spki(self.graph.certs[i].public_key())) not in twins
        ]

    def _alternates(self, found: _Path) -> tuple[x509.Certificate, ...]:
        return tuple(self.graph.certs[i] for i in self._off_path(found))

    def explain(self, best: _Path) -> CertificateRejected:
        certs = self.graph.certs
        leaf = certs[best.indexes[0]]
        unrelated = self._unrelated(best)
        names = ", ".join(pki.describe_name(c.subject) for c in unrelated)
        if best.complete:
            chain = " -> ".join(pki.describe_name(certs[i].subject) for i in best.indexes)
            return ChainInvalid(
                f"{'certificate' if len(unrelated) == 1 else 'certificates'} {names} "
                f"{'is' if len(unrelated) == 1 else 'are'} not part of the chain of the leaf "
                f"({chain}); remove {'it' if len(unrelated) == 1 else 'them'} from the upload"
            )
        top = certs[best.indexes[-1]]
        role = _role(top, leaf)
        if len(best.indexes) >= MAX_CHAIN_LENGTH:
            return ChainInvalid(
                f"the chain is longer than {MAX_CHAIN_LENGTH} certificates; upload only the "
                f"leaf and the chain it is served with"
            )
        same_name = [c for c in certs if c.subject == top.issuer and c is not top]
        on_path = [certs[i] for i in best.indexes]
        if any(c in on_path for c in same_name):
            return ChainInvalid(
                f"the uploaded certificates form a loop: {role} is issued by "
                f"{pki.describe_name(top.issuer)}, which is already below it in the chain"
            )
        insecure = pki.INSECURE_SIGNATURE_OIDS.get(top.signature_algorithm_oid.dotted_string)
        if insecure and (same_name or self.trust.issuers_named(top.issuer)):
            return InsecureSignature(
                f"{role} is signed with {insecure}, a broken hash (its signature cannot even be "
                f"checked); have it reissued with SHA-256 or stronger"
            )
        if same_name:
            return ChainInvalid(
                f"{role} names {pki.describe_name(top.issuer)} as its issuer; an uploaded "
                f"certificate has that name, but its key does not verify the signature (it is "
                f"another certificate of the same name, e.g. an older or renewed CA, or the "
                f"signature is damaged); upload the CA certificate that issued this one"
            )
        anchors = self.trust.issuers_named(top.issuer)
        signing = [a for a in anchors if pki.signature_verifies(top, a.public_key())]
        for anchor in signing:
            if anchor.not_valid_after_utc < self.at:
                return CertificateExpired(
                    f"the trusted root CA {pki.describe_name(anchor.subject)} that issued "
                    f"{role} expired on {_when(anchor.not_valid_after_utc)} (validation time "
                    f"{_when(self.at)}); get a certificate from a CA whose root is still valid"
                )
            return NotYetValid(
                f"the trusted root CA {pki.describe_name(anchor.subject)} that issued {role} "
                f"is not valid before {_when(anchor.not_valid_before_utc)} (validation time "
                f"{_when(self.at)})"
            )
        if anchors:
            return ChainInvalid(
                f"{role} names {pki.describe_name(top.issuer)} as its issuer; a trusted CA has "
                f"that name, but its key does not verify the signature (a different CA of the "
                f"same name, or a damaged signature); upload the intermediate that issued it"
            )
        missing = pki.describe_name(top.issuer)
        fix = (
            f"add the intermediate certificate(s) from your CA after the leaf in the "
            f"certificate field, or add the CA {missing} to the trusted CAs"
            if top is leaf
            else f"add the CA certificate {missing} to the upload, or to the trusted CAs"
        )
        description = (
            f"no issuer found for {role}: its issuer {missing} is neither in the upload nor "
            f"among the trusted CAs; {fix}"
        )
        if _self_issued(top):
            description += (
                f" ({role} names itself as issuer, but its signature does not verify with its "
                f"own key)"
            )
        if unrelated:
            description += f"; the uploaded {names} did not issue it"
        return IssuerNotFound(description)


# --- step 6: CA rules along the chain ----------------------------------------------------------


def _check_issuers(chain: Sequence[x509.Certificate], leaf: x509.Certificate) -> None:
    """Every certificate that issues the one below it must be a CA allowed to sign certs."""
    for depth in range(1, len(chain)):
        issuer, child = chain[depth], chain[depth - 1]
        what = f"{pki.describe_name(issuer.subject)} issued {_role(child, leaf)} but is not a CA"
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise NotACA(
                f"{what}: it has no basicConstraints extension (CA:TRUE is required); get the "
                f"correct intermediate certificate from your CA"
            ) from None
        if not constraints.ca:
            raise NotACA(
                f"{what}: its basicConstraints say CA:FALSE; only CA certificates may issue "
                f"certificates: get the correct intermediate certificate from your CA"
            )
        try:
            usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise IssuerKeyUsage(
                f"CA {pki.describe_name(issuer.subject)} issued {_role(child, leaf)} but its "
                f"keyUsage ({_key_usage_names(usage)}) does not include keyCertSign, so it may "
                f"not sign certificates (RFC 5280 4.2.1.3) and TLS clients refuse the chain; "
                f"get the correct CA certificate, one with keyUsage keyCertSign, from your CA"
            )
        # RFC 5280 6.1.4 (l)/(m): pathLenConstraint counts the non-self-issued intermediates
        # below this CA; the leaf does not count.
        below = sum(1 for c in chain[1:depth] if not _self_issued(c))
        if constraints.path_length is not None and below > constraints.path_length:
            raise ChainInvalid(
                f"{pki.describe_name(issuer.subject)} allows at most "
                f"{constraints.path_length} intermediate CA(s) below it (pathLenConstraint), but "
                f"the chain has {below}"
            )


# --- step 7: policy ----------------------------------------------------------------------------


def _eku_names(oids: Sequence[x509.ObjectIdentifier]) -> str:
    return ", ".join(_EKU_NAMES.get(o, o.dotted_string) for o in oids) or "empty"


def _extended_key_usage(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


_KEY_USAGE_BITS = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)
# cryptography raises when these are read without keyAgreement (they qualify it).
_KEY_AGREEMENT_BITS = (("encipher_only", "encipherOnly"), ("decipher_only", "decipherOnly"))


def _key_usage_names(usage: x509.KeyUsage) -> str:
    names = [name for attribute, name in _KEY_USAGE_BITS if getattr(usage, attribute)]
    if usage.key_agreement:
        names += [name for attribute, name in _KEY_AGREEMENT_BITS if getattr(usage, attribute)]
    return ", ".join(names) or "empty"


def _check_key_usage(row: CertificateName, leaf: x509.Certificate) -> None:
    """RFC 5280 4.2.1.3 and 4.2.1.12: a keyUsage extension must allow what the name's EKUs need.

    TLS 1.2 (ECDHE) and 1.3 authenticate both sides with a signature, so digitalSignature is
    what every use needs; an RSA server key may instead have keyEncipherment (TLS 1.2 RSA key
    exchange, what OpenSSL accepts). keyAgreement (static ECDH) is not enough: no TLS version
    OpenSSL speaks uses it. A leaf without keyUsage may do anything.
    """
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    rsa_key = isinstance(leaf.public_key(), rsa.RSAPublicKey)
    for purpose in sorted(row.required_eku):
        enciphers = purpose == SERVER_AUTH and rsa_key
        if usage.digital_signature or (enciphers and usage.key_encipherment):
            continue
        needed = "digitalSignature or keyEncipherment" if enciphers else "digitalSignature"
        fix = "digitalSignature, keyEncipherment" if enciphers else "digitalSignature"
        key = pki.describe_key(leaf.public_key())
        raise KeyUsageMismatch(
            f"the leaf's keyUsage ({_key_usage_names(usage)}) lacks {needed}, which {purpose} "
            f"with an {key} key needs (RFC 5280 4.2.1.12) for {row.name!r} ({row.secures}); "
            f"TLS peers refuse it with 'unsuitable certificate purpose': have the certificate "
            f"reissued with keyUsage = critical, {fix}"
        )


def _check_policy(upload: _Upload, chain: _Chain) -> None:
    """DESIGN §5 policy on the chain as built; ``alternates`` are served too, so they count."""
    row, leaf = upload.row, chain.path[0]
    served = (*chain.path, *chain.alternates)
    issuers = (*served[1:], *chain.anchors[:1])
    if upload.key is not None and _is_ca(leaf):
        hint = (
            "; to make a self-signed end-entity certificate add "
            "-addext basicConstraints=critical,CA:FALSE to openssl req -x509"
            if pki.is_self_signed(leaf)
            else ""
        )
        raise LeafIsCA(
            f"the leaf {pki.describe_name(leaf.subject)} is a CA certificate (basicConstraints "
            f"CA:TRUE); {row.name!r} needs an end-entity certificate: have your CA issue a "
            f"{'/'.join(sorted(row.required_eku)) or 'TLS'} certificate with CA:FALSE{hint}"
        )
    required = sorted(row.required_eku)
    usages = _extended_key_usage(leaf)
    if usages is not None:
        missing = [r for r in required if _EKU_OIDS[r] not in usages]
        if missing:
            raise MissingExtendedKeyUsage(
                f"the leaf's extendedKeyUsage ({_eku_names(usages)}) lacks "
                f"{', '.join(missing)}, which {row.name!r} ({row.secures}) needs; have the "
                f"certificate reissued with extendedKeyUsage = {', '.join(required)}"
            )
    if upload.key is not None:
        _check_key_usage(row, leaf)
    for cert in issuers:
        usages = _extended_key_usage(cert)
        if usages is None:
            continue
        missing = [r for r in required if _EKU_OIDS[r] not in usages]
        if missing:
            # OpenSSL's purpose check, which every service we configure runs, does not count
            # anyExtendedKeyUsage on a CA either (Chromium and Go do).
            any_eku = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages
            raise MissingExtendedKeyUsage(
                f"CA {pki.describe_name(cert.subject)} restricts the certificates it "
                f"issues to {_eku_names(usages)}, which excludes {', '.join(missing)} needed by "
                f"{row.name!r}"
                f"{' (OpenSSL does not count anyExtendedKeyUsage on a CA)' if any_eku else ''}; "
                f"TLS libraries reject such chains: use a chain from a CA meant for "
                f"{', '.join(required)}"
            )
    for cert in served:
        if cert is not leaf and pki.is_self_signed(cert):
            continue  # a root's self-signature is never checked by clients
        dotted = cert.signature_algorithm_oid.dotted_string
        if dotted in pki.INSECURE_SIGNATURE_OIDS:
            raise InsecureSignature(
                f"{_role(cert, leaf)} is signed with {pki.INSECURE_SIGNATURE_OIDS[dotted]}, a "
                f"broken hash that lets attackers forge certificates; have it reissued with "
                f"SHA-256 or stronger"
            )
    for cert in (*served, *chain.anchors[:1]):
        if cert is leaf and upload.key is not None:
            continue  # the uploaded key was judged while parsing
        _check_key_strength(cert.public_key(), f"the public key of {_role(cert, leaf)}")
    if not leaf.subject:
        try:
            critical = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
        except x509.ExtensionNotFound:
            critical = False
        if not critical:
            raise InvalidCertificate(
                "the leaf has an empty subject, so RFC 5280 (4.2.1.6) requires a critical "
                "subjectAltName extension naming it; have the certificate reissued"
            )


# The web PKI CA profile, relaxed where OpenSSL (the TLS library of every service we configure)
# and real trust stores disagree with it: keyUsage may be absent (openssl req -x509 leaves it
# out), basicConstraints may be non-critical and AKI/SKI may be absent or unusual (some system
# roots), and EKU is ours to judge per name. What remains: CA bit, pathLen, name constraints,
# unknown critical extensions, policy constraints, validity, allowed algorithms and signatures.
_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectKeyIdentifier, Criticality.AGNOSTIC, None)
)


def _ee_policy(leaf_is_ca: bool) -> ExtensionPolicy:
    """The web PKI end-entity profile, minus what DESIGN §5 decides per name.

    SAN may be absent (SAML certificates have none), EKU is judged by :func:`_check_policy`,
    AKI may be absent as OpenSSL allows. A CA used as a keyless leaf (``sso_issuer``) may keep
    its CA basicConstraints and keyCertSign. What remains: critical-extension rules, no name
    constraints on a leaf, no keyCertSign on a non-CA, AIA non-critical.
    """
    policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    )
    if leaf_is_ca:
        policy = policy.may_be_present(
            x509.BasicConstraints, Criticality.AGNOSTIC, None
        ).may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, None)
    return policy


def _verifier_supports(
    signed: Sequence[x509.Certificate], issuers: Sequence[x509.Certificate]
) -> bool:
    if any(c.signature_algorithm_oid.dotted_string not in _VERIFIER_SIGNATURE_OIDS for c in signed):
        return False
    for issuer in issuers:
        public = issuer.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.name not in _CURVES:
                return False
        elif not isinstance(public, rsa.RSAPublicKey):
            return False
    return True


def _check_conformance(
    path: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], at: dt.datetime
) -> None:
    """Run cryptography's RFC 5280 path validation over exactly the chain we built.

    It covers what our own checks do not (unknown critical extensions, name constraints, policy
    constraints). It is skipped for a self-signed leaf and for chains signed with algorithms
    outside its web PKI set (Ed25519, Ed448, DSA issuers): those get our checks only.
    """
    if not anchors and len(path) == 1:
        return
    # Every trusted issuer of the top certificate goes in the store: the verifier may need
    # another one than ours (e.g. one whose name constraints allow this leaf).
    roots = list(anchors) if anchors else [path[-1]]
    intermediates = list(path[1:] if anchors else path[1:-1])
    signed = path if anchors else path[:-1]
    if not _verifier_supports(signed, [*intermediates, roots[0]]):
        return
    # notBefore up to CLOCK_SKEW ahead is accepted above; verify at the latest notBefore then.
    moment = max([at, *(c.not_valid_before_utc for c in (*path, roots[0]))])
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(moment)
        .max_chain_depth(MAX_CHAIN_LENGTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_ee_policy(_is_ca(path[0])))
        .build_client_verifier()
    )
    with pki.recorded_warnings():
        try:
            verifier.verify(path[0], intermediates)
        except VerificationError as exc:
            reason = str(exc).removeprefix("validation failed: ")
            raise ChainInvalid(
                f"the chain breaks an X.509 (RFC 5280) rule: {reason}; get a conforming chain "
                f"from your CA"
            ) from None


# --- step 8: the client's-eye check ------------------------------------------------------------


def _server_name(leaf: x509.Certificate) -> str | None:
    """The first DNS or IP subjectAltName, as a client would connect to it (a wildcard's ``*``
    replaced by a label); None without one (such leaves were warned about)."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for general in sans:
        if isinstance(general, x509.IPAddress):
            return str(general.value)
        if isinstance(general, x509.DNSName):
            value = general.value
            return f"check{value[1:]}" if value.startswith("*.") else value
    return None


def _check_with_tls_peers(upload: _Upload, chain: _Chain, chain_pem: str) -> None:
    """Handshake in memory as the name's peers would, trusting only the chain's anchor.

    The last line of defence: our rules before this one name the usual causes precisely; this
    catches whatever else OpenSSL refuses. Server names: a client checking the host name
    (purpose sslserver). Client names: a server requiring client certificates (sslclient).
    """
    row = upload.row
    if upload.key is None or not row.required_eku:
        return
    anchor = chain.anchor or chain.path[-1]
    anchor_pem = pki.certificates_to_pem([anchor])
    key_pem = pki.key_to_pem(upload.key)
    trusting = f"trusting only {pki.describe_name(anchor.subject)}"
    size = sum(len(c.public_bytes(serialization.Encoding.DER)) for c in chain.path)
    if SERVER_AUTH in row.required_eku:
        host = _server_name(chain.path[0])
        refusal = handshake.refusal_as_server(chain_pem, key_pem, anchor_pem, host)
        if refusal is not None:
            peer = "TLS client" + (f" connecting to {host!r}" if host else "")
            _refuse(row, refusal, "server", f"a {peer}, {trusting}", size)
    if CLIENT_AUTH in row.required_eku:
        refusal = handshake.refusal_as_client(chain_pem, key_pem, anchor_pem)
        if refusal is not None:
            peer = f"a TLS server requiring client certificates, {trusting}"
            _refuse(row, refusal, "client", peer, size)


def _refuse(
    row: CertificateName, refusal: handshake.Refusal, role: str, peer: str, size: int
) -> None:
    """Raise :class:`RejectedByTLSClient` for ``refusal`` of the upload in ``role`` ("server"
    or "client") by ``peer``; ``size``: the chain's DER bytes."""
    purpose = SERVER_AUTH if role == "server" else CLIENT_AUTH
    if refusal.side == role:  # the side presenting the upload could not even use it
        what = f"OpenSSL cannot use it as a TLS {role} certificate: {refusal.reason}"
    else:
        what = f"{peer}, refuses it: {refusal.reason}"
    if "purpose" in refusal.reason:
        fix = (
            f"the keyUsage, extendedKeyUsage or Netscape certificate type of the leaf or of a "
            f"CA of its chain does not allow TLS {purpose}: have it reissued with keyUsage = "
            f"critical, digitalSignature and extendedKeyUsage = "
            f"{', '.join(sorted(row.required_eku))}, without a Netscape certificate type"
        )
    elif refusal.reason == "EXCESSIVE_MESSAGE_SIZE":
        fix = (
            f"the certificates sent in the handshake take {size // 1024} KiB, and OpenSSL "
            f"peers accept at most 100 KiB by default (SSL_CTX_set_max_cert_list): have it "
            f"reissued with fewer subjectAltNames, or split it into several certificates"
        )
    else:
        fix = (
            f"reproduce with openssl verify -purpose ssl{role} -CAfile root.pem -untrusted "
            f"chain.pem leaf.pem and have the certificate reissued by your CA"
        )
    raise RejectedByTLSClient(
        f"the certificate would not work for {row.name!r} ({row.secures}): in a TLS "
        f"handshake, {what}; {fix}"
    )


# --- the pipelines -----------------------------------------------------------------------------


def _validate_chain(upload: _Upload, at: dt.datetime, trust: TrustStore) -> ValidatedCertificate:
    graph = _Graph.of(upload.certs)
    leaf_index = graph.leaf_index(upload.key)
    leaf = graph.certs[leaf_index]
    if upload.key is not None:
        _check_key_match(graph, leaf, upload.key)
    _check_validity(upload.certs, leaf, at)
    chain = _ChainBuilder(graph, trust, at).build(leaf_index)
    anchored = [*chain.path, chain.anchor] if chain.anchor is not None else list(chain.path)
    _check_issuers(anchored, leaf)
    _check_policy(upload, chain)
    _check_conformance(chain.path, chain.anchors, at)
    certs = (*chain.path, *chain.alternates)
    chain_pem = pki.certificates_to_pem(certs)
    _check_with_tls_peers(upload, chain, chain_pem)

    notes = list(upload.notes)
    if chain.anchor is None and len(chain.path) == 1:
        notes.append(
            f"the leaf {pki.describe_name(leaf.subject)} is self-signed: every client must be "
            f"configured to trust this very certificate"
        )
    for twin in chain.alternates:
        notes.append(
            f"certificate {pki.describe_name(twin.subject)} is a cross-signed twin of a chain "
            f"certificate; it is kept at the end of the chain for clients that need it"
        )
    if "serverAuth" in upload.row.required_eku and pki.san_count(leaf) == 0:
        notes.append(
            "the leaf has no subjectAltName: TLS clients match host names against SANs only, "
            "so most will reject it"
        )
    notes.extend(_start_warnings(anchored, leaf, at))
    notes.extend(_expiry_warnings(anchored, leaf, at))
    return ValidatedCertificate(
        name=upload.row.name,
        chain=certs,
        chain_pem=chain_pem,
        key_pem=pki.key_to_pem(upload.key) if upload.key is not None else None,
        fingerprint_sha256=pki.fingerprint_sha256(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        warnings=tuple(notes),
    )


def _validate_bundle(upload: _Upload, at: dt.datetime, trust: TrustStore) -> ValidatedCertificate:
    """A CA bundle: any number of CA certificates (up to the PEM block budget), related or not.

    The CA check comes first here: a client certificate uploaded by mistake should be told
    "not a CA", not "issuer not found".
    """
    certs, row = upload.certs, upload.row
    for cert in certs:
        if not _is_ca(cert):
            raise NotACA(
                f"{row.name!r} holds CA certificates only, and {pki.describe_name(cert.subject)} "
                f"is not a CA (basicConstraints CA:TRUE missing); upload the CA certificate(s) "
                f"that issue your client certificates"
            )
    first = certs[0]
    _check_validity(certs, first, at)
    graph = _Graph.of(certs)
    builder = _ChainBuilder(graph, trust, at)
    for index, cert in enumerate(certs):
        if graph.self_signed[index] or graph.issuers[index]:
            continue
        complete, anchors = builder.ending(index)
        if not complete:
            raise builder.explain(_Path((index,), (), False))
        _check_issuers([cert, anchors[0]], first)
    for index, cert in enumerate(certs):
        for issuer in graph.issuers[index][:1]:
            _check_issuers([cert, certs[issuer]], first)
        if not graph.self_signed[index]:
            dotted = cert.signature_algorithm_oid.dotted_string
            if dotted in pki.INSECURE_SIGNATURE_OIDS:
                raise InsecureSignature(
                    f"CA certificate {pki.describe_name(cert.subject)} is signed with "
                    f"{pki.INSECURE_SIGNATURE_OIDS[dotted]}, a broken hash; have it reissued "
                    f"with SHA-256 or stronger"
                )
        _check_key_strength(
            cert.public_key(), f"the public key of {pki.describe_name(cert.subject)}"
        )
    notes = [*upload.notes, *_start_warnings(certs, first, at), *_expiry_warnings(certs, first, at)]
    return ValidatedCertificate(
        name=row.name,
        chain=certs,
        chain_pem=pki.certificates_to_pem(certs),
        key_pem=None,
        fingerprint_sha256=pki.fingerprint_sha256(first),
        not_before=max(c.not_valid_before_utc for c in certs),
        not_after=min(c.not_valid_after_utc for c in certs),
        warnings=tuple(notes),
    )
