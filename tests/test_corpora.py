"""Third-party conformance corpora run through :func:`validate_upload` (see docs/validation.md).

Every case is one test id. A case either runs against upstream's expectation, runs as a
documented *deviation* (our rule differs on purpose; the reason is in the table and the docs),
or is *excluded* (not collected) because it exercises a feature an upload does not have,
again with the reason. ``test_accounting`` keeps the counts in docs/validation.md honest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clustercert import pki
from clustercert.errors import CertificateRejected
from clustercert.validation import TrustStore, validate_upload

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
if not CORPORA.is_dir():
    # CI lays shared/ beside the clone: there, a missing corpus is a failure, not a skip.
    if os.environ.get("CI"):
        raise RuntimeError(f"conformance corpora not found at {CORPORA}")
    pytest.skip(
        f"conformance corpora not found at {CORPORA} (CI checks them out beside the repo)",
        allow_module_level=True,
    )

# limbo's null validation time means "now"; its generated certificates are valid 1970-2969.
LIMBO_NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
CHROMIUM_DEFAULT_TIME = "211005120000Z"  # what Chromium's harness maps DEFAULT to


@dataclass(frozen=True)
class Case:
    """One corpus case as an upload: ``expect`` is "accept" or an error_code or "reject"."""

    id: str
    name: str
    certificate: str
    key: str | None
    trust: tuple[str, ...]
    at: dt.datetime
    expect: str
    deviation: str | None = None
    excluded: str | None = None


def _load_certs(pem: str) -> list[x509.Certificate]:
    # Corpus certificates are deliberately odd; cryptography's parse warnings are expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(pem.encode())


def _single_chain(pems: list[str]) -> bool:
    """Whether the upload is exactly one chain by name: each certificate's issuer appears at most
    once, and following issuers from the first reaches every certificate."""
    certs = [c for pem in pems for c in _load_certs(pem)]
    if len({c.subject for c in certs}) != len(certs):
        return False
    remaining, current = certs[1:], certs[0]
    while remaining:
        issuers = [c for c in remaining if c.subject == current.issuer]
        if len(issuers) != 1:
            return False
        current = issuers[0]
        remaining.remove(current)
    return True


def _outcome(case: Case) -> str:
    try:
        validate_upload(
            case.name,
            case.certificate,
            case.key,
            at=case.at,
            trust=TrustStore.of([c for pem in case.trust for c in _load_certs(pem)]),
        )
    except CertificateRejected as exc:
        return exc.error_code
    return "accept"


def _check(case: Case) -> None:
    got = _outcome(case)
    if case.expect == "reject":
        assert got != "accept", f"{case.id}: accepted, upstream expects a rejection"
    else:
        assert got == case.expect, f"{case.id}: got {got}, expected {case.expect}"


def _params(cases: list[Case]) -> list[Any]:
    # Excluded cases are not collected at all (a skip would hide in a green run); their count
    # and reasons are checked against docs/validation.md by test_accounting.
    return [pytest.param(c, id=c.id) for c in cases if not c.excluded]


# --- x509-limbo --------------------------------------------------------------------------------

LIMBO_UNSUPPORTED_FEATURES = {
    "has-crl": "revocation (CRLs) is not part of an upload",
    "max-chain-depth": "the chain depth is a fixed budget, not a per-request setting",
    "name-constraint-dn": "directoryName name constraints are not supported",
    "has-policy-constraints": "certificate policies are not processed",
    "pedantic-webpki-eku": "DESIGN §5 allows leaves without EKU; EKU is judged per name",
    "pedantic-serial-number": "malformed serial numbers are accepted with a warning",
    "pedantic-public-suffix-wildcard": "host names are not matched on upload",
    "pedantic-rfc5280": "pedantic RFC 5280 rules are not enforced",
    "rfc5280-incompatible-with-webpki": "we follow the web PKI reading",
}
LIMBO_HOSTNAME = "host-name matching: an upload names no peer, clients check host names"
LIMBO_NOT_ONE_CHAIN = (
    "the upload is not one chain (alternative paths or unused intermediates); DESIGN §5 "
    "rejects unrelated extra certificates, so path selection is not exercised"
)
LIMBO_KEYLESS_EKU = (
    "no key: run as sso_issuer, which has no EKU rule, so a bad EKU cannot be rejected"
)

R_LEAF_CA = "DESIGN §5: a keyed leaf must not be a CA (leaf_is_ca)"
R_SELF_ISSUED = (
    "cryptography's verifier (our RFC 5280 pass) cannot build paths through self-issued "
    "intermediates, so these chains fail closed"
)
R_KEY_IDS = (
    "AKI/SKI are not required nor profiled: OpenSSL does not require them and system roots "
    "lack them or carry unusual ones"
)
R_SKEW = "DESIGN §5: notBefore up to 5 minutes in the future is tolerated (clock skew)"
R_UPLOADED_ROOT = "DESIGN §5: a chain may end in an uploaded self-signed root"
R_EXPIRED_UPLOAD = (
    "DESIGN §5: an expired uploaded certificate is rejected (406) even when another path "
    "exists: nodes serve what was uploaded"
)
R_SERVED_TWIN = (
    "DESIGN §5: every served intermediate is checked, including an uploaded cross-signed twin "
    "of the trusted root that the path does not need (here SHA-1 signed)"
)
R_BC_CRITICAL = "basicConstraints criticality is not enforced (three Debian system roots)"
R_SAN_SYNTAX = "SAN DNS-name syntax is a host-name matching concern, not enforced on upload"

LIMBO_DEVIATIONS = {
    "pathlen::validation-ignores-pathlen-in-leaf": R_LEAF_CA,
    "rfc5280::ca-as-leaf": R_LEAF_CA,
    "rfc5280::aki::leaf-missing-aki": R_KEY_IDS,
    "rfc5280::aki::intermediate-missing-aki": R_KEY_IDS,
    "rfc5280::ski::root-missing-ski": R_KEY_IDS,
    "rfc5280::ski::intermediate-missing-ski": R_KEY_IDS,
    "webpki::aki::root-with-aki-missing-keyidentifier": R_KEY_IDS,
    "webpki::aki::root-with-aki-all-fields": R_KEY_IDS,
    "webpki::aki::root-with-aki-ski-mismatch": R_KEY_IDS,
    "rfc5280::validity::notbefore-fractional": R_SKEW,
    "rfc5280::validity::not-yet-valid-1-second": R_SKEW,
    "rfc5280::validity::not-yet-valid-5-seconds": R_SKEW,
    "rfc5280::chain-untrusted-root": R_UPLOADED_ROOT,
    "pathological::multiple-chains-expired-intermediate": R_EXPIRED_UPLOAD,
    "bettertls::pathbuilding::tc21": R_SERVED_TWIN,
    "rfc5280::root-non-critical-basic-constraints": R_BC_CRITICAL,
    "rfc5280::san::underscore-dns": R_SAN_SYNTAX,
}


@cache
def _bettertls_features() -> dict[str, tuple[str, ...]]:
    data = json.loads((CORPORA / "bettertls" / "pathbuilding.tests.json").read_text())
    cases = data["suites"]["pathbuilding"]["testCases"]
    return {f"bettertls::pathbuilding::tc{c['id']}": tuple(c["requiredFeatures"]) for c in cases}


def _limbo_exclusion(test: dict[str, Any]) -> str | None:
    if test["validation_kind"] != "SERVER":
        return "CLIENT validation (peer e-mail names); uploads are run as SERVER cases"
    for feature in test["features"]:
        if feature in LIMBO_UNSUPPORTED_FEATURES:
            return f"feature {feature}: {LIMBO_UNSUPPORTED_FEATURES[feature]}"
    if test["id"].startswith(("webpki::san::", "webpki::cn::")) or test["id"] in (
        "rfc5280::ca-as-leaf-wrong-san",
    ):
        return LIMBO_HOSTNAME
    upload = [test["peer_certificate"], *test["untrusted_intermediates"]]
    if "denial-of-service" not in test["features"] and not _single_chain(upload):
        return LIMBO_NOT_ONE_CHAIN
    features = _bettertls_features().get(test["id"], ())
    if (
        not test.get("peer_certificate_key")
        and "INVALID_REASON_BAD_EKU" in features
        and test["expected_result"] == "FAILURE"
    ):
        return LIMBO_KEYLESS_EKU
    return None


@cache
def limbo_cases() -> list[Case]:
    data = json.loads((CORPORA / "x509-limbo" / "limbo.json").read_text())
    cases = []
    for test in data["testcases"]:
        upstream = "accept" if test["expected_result"] == "SUCCESS" else "reject"
        deviation = LIMBO_DEVIATIONS.get(test["id"])
        key = test.get("peer_certificate_key")
        time = test["validation_time"]
        cases.append(
            Case(
                id=test["id"],
                # Most cases come with the leaf's key; the rest run as the keyless sso_issuer.
                name="proxy" if key else "sso_issuer",
                certificate=test["peer_certificate"] + "".join(test["untrusted_intermediates"]),
                key=key,
                trust=tuple(test["trusted_certs"]),
                at=dt.datetime.fromisoformat(time) if time else LIMBO_NOW,
                expect=("reject" if upstream == "accept" else "accept") if deviation else upstream,
                deviation=deviation,
                excluded=_limbo_exclusion(test),
            )
        )
    return cases


@pytest.mark.parametrize("case", _params(limbo_cases()))
def test_limbo(case: Case) -> None:
    _check(case)


def _branching() -> list[Any]:
    features = _bettertls_features()
    return [
        pytest.param(c, id=c.id)
        for c in limbo_cases()
        if c.excluded == LIMBO_NOT_ONE_CHAIN
        and c.expect == "reject"
        and not (c.key is None and "INVALID_REASON_BAD_EKU" in features.get(c.id, ()))
    ]


@pytest.mark.parametrize("case", _branching())
def test_limbo_branching_uploads_fail_safe(case: Case) -> None:
    """Excluded above because an upload must be one chain; still, none that upstream rejects
    may be accepted (and none may crash or hang: the bounded builder is exercised here)."""
    assert _outcome(case) != "accept"


# --- Chromium verify_certificate_chain_unittest -------------------------------------------------

CHROMIUM = CORPORA / "chromium-verify-certificate-chain" / "verify_certificate_chain_unittest"
CHROMIUM_ANCHOR_MODES = {
    "TRUSTED_ANCHOR",
    "TRUSTED_ANCHOR_WITH_EXPIRATION",
    "TRUSTED_ANCHOR_WITH_CONSTRAINTS",
    "TRUSTED_ANCHOR_WITH_EXPIRATION_AND_CONSTRAINTS",
    "TRUSTED_ANCHOR_WITH_REQUIRE_BASIC_CONSTRAINTS",
    "TRUSTED_ANCHOR_WITH_CONSTRAINTS_REQUIRE_BASIC_CONSTRAINTS",
}
PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", re.S)
CHROMIUM_NAMES = {"SERVER_AUTH": "proxy", "CLIENT_AUTH": "ldap_client", "ANY_EKU": "sso_service"}
R_ANCHOR_CHECKED = (
    "the trust anchor's validity and CA extensions are always enforced; Chromium's plain "
    "TRUSTED_ANCHOR ignores them"
)
R_PARSER = "cryptography 50 cannot parse a certificate of this chain, so it is rejected"
CHROMIUM_DEVIATIONS = {
    "expired-root/not-after": R_ANCHOR_CHECKED,
    "expired-root/not-before": R_ANCHOR_CHECKED,
    "expired-root/not-after-ta-with-constraints": R_ANCHOR_CHECKED,
    "root-basic-constraints-ca-false/main": R_ANCHOR_CHECKED,
    "root-lacks-basic-constraints/main": R_ANCHOR_CHECKED,
    "root-lacks-basic-constraints/ta-with-constraints": R_ANCHOR_CHECKED,
    "root-lacks-basic-constraints/ta-with-require-basic-constraints": R_ANCHOR_CHECKED,
    "root-lacks-keycertsign-key-usage/main": R_ANCHOR_CHECKED,
    "root-eku-clientauth/serverauth": R_ANCHOR_CHECKED,
    "root-eku-clientauth/serverauth-ta-with-expiration": R_ANCHOR_CHECKED,
    "violates-pathlen-1-from-root/main": R_ANCHOR_CHECKED,
    "basic-constraints-pathlen-0-self-issued/main": R_SELF_ISSUED,
    "intermediate-eku-c2pamanifest/any": R_PARSER,
    "intermediate-eku-c2patimestamping/any": R_PARSER,
    "target-has-pathlen-but-not-ca/main": R_PARSER,
    "unknown-non-critical-policy-qualifier/main": R_PARSER,
    "intermediate-eku-server-gated-crypto/sha1-eku-any": (
        "DESIGN §5: SHA-1 signatures on intermediates are rejected"
    ),
    "target-eku-any/clientauth": (
        "anyExtendedKeyUsage alone does not satisfy clientAuth (as in OpenSSL's purpose check)"
    ),
    "target-eku-any/serverauth": (
        "anyExtendedKeyUsage alone does not satisfy serverAuth (as in OpenSSL's purpose check)"
    ),
    "target-has-ca-basic-constraints/main": R_LEAF_CA,
    "target-not-end-entity/main": R_LEAF_CA,
    "target-has-keycertsign-but-not-ca/main": (
        "a non-CA leaf asserting keyCertSign breaks RFC 5280 4.2.1.3 and is rejected"
    ),
    "intermediate-eku-any-and-clientauth/serverauth": (
        "anyExtendedKeyUsage on a CA does not count, as in OpenSSL's purpose check (which "
        "refuses this chain in a handshake); Chromium accepts it"
    ),
    "target-msapplicationpolicies-and-eku/main": (
        "unknown critical extensions are rejected (RFC 5280 4.2); Chromium special-cases this one"
    ),
}


def _chromium_test(path: Path) -> tuple[dict[str, str], str]:
    fields: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("#"):
            continue
        if line.startswith("expected_errors:"):
            return fields, "\n".join(lines[index + 1 :])
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields, ""


def _matching_key(folder: Path, leaf_pem: str) -> str | None:
    key_file = folder / "keys" / "Target.key"
    if not key_file.is_file():
        return None
    text = key_file.read_text()  # it starts with the command that made it: text around PEM
    key = serialization.load_pem_private_key(
        re.sub(r"^.*?(?=-----BEGIN)", "", text, flags=re.S).encode(), None
    )
    leaf = _load_certs(leaf_pem)[0]
    if pki.spki_sha256(key.public_key()) != pki.spki_sha256(leaf.public_key()):
        return None  # target-selfissued: its Target.key belongs to another certificate
    return text


def _chromium_exclusion(fields: dict[str, str], blocks: list[str], key: str | None) -> str | None:
    folder_kind = fields["__folder"]
    if fields["last_cert_trust"] not in CHROMIUM_ANCHOR_MODES:
        return f"trust mode {fields['last_cert_trust']}: leaf pinning/distrust has no upload form"
    if len(blocks) < 2:
        return "the chain is only the trust anchor: nothing to upload"
    if fields["key_purpose"] not in CHROMIUM_NAMES:
        return f"key purpose {fields['key_purpose']}: strict/MLS/C2PA EKU profiles not implemented"
    if key is None and fields["key_purpose"] != "ANY_EKU":
        return "no key for the target: a keyed name's EKU rule cannot be exercised"
    if folder_kind.startswith(("policies-", "policy-mappings-")):
        return "certificate policies are not processed (critical policy extensions fail closed)"
    return None


@cache
def chromium_cases() -> list[Case]:
    cases = []
    for test in sorted(CHROMIUM.glob("*/*.test")):
        fields, errors = _chromium_test(test)
        fields["__folder"] = test.parent.name
        chain = (test.parent / fields["chain"]).read_text()
        blocks = re.findall(
            r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", chain, re.S
        )
        key = _matching_key(test.parent, blocks[0]) if blocks else None
        case_id = f"{test.parent.name}/{test.stem}"
        upstream = "reject" if "ERROR:" in errors else "accept"
        deviation = CHROMIUM_DEVIATIONS.get(case_id)
        stamp = fields.get("utc_time", "DEFAULT")
        stamp = CHROMIUM_DEFAULT_TIME if stamp == "DEFAULT" else stamp
        name = CHROMIUM_NAMES.get(fields["key_purpose"], "proxy")
        cases.append(
            Case(
                id=case_id,
                name=name if key is not None else "sso_issuer",
                certificate="".join(blocks[:-1]),
                key=key,
                trust=tuple(blocks[-1:]),
                at=dt.datetime.strptime(stamp, "%y%m%d%H%M%SZ").replace(tzinfo=dt.UTC),
                expect=("reject" if upstream == "accept" else "accept") if deviation else upstream,
                deviation=deviation,
                excluded=_chromium_exclusion(fields, blocks, key),
            )
        )
    return cases


@pytest.mark.parametrize("case", _params(chromium_cases()))
def test_chromium(case: Case) -> None:
    _check(case)


# --- badssl.com pre-generated chains -----------------------------------------------------------
# Real, publicly issued chains without their roots. Each file is uploaded as served, with its
# top certificate as the trust anchor (single-certificate files: no trust), at the middle of
# the window in which all its certificates are valid. No keys ship, so the keyless sso_issuer.

BADSSL = CORPORA / "badssl-pregen" / "chain"
BADSSL_EXPECT = {
    "fallback.pem": "issuer_not_found",  # issued by the BadSSL intermediate, not included
    "subdomain-dsdtestprovider.pem": "issuer_not_found",  # compromised roots: never trusted
    "subdomain-edellroot.pem": "issuer_not_found",
    "subdomain-superfish.pem": "issuer_not_found",
    "wildcard-incomplete-chain.pem": "issuer_not_found",
    "wildcard-sha1-2016.pem": "insecure_signature",
    "wildcard-sha1-2017.pem": "insecure_signature",
    "wildcard-sha1-intermediate.pem": "insecure_signature",
}


def _window_middle(certs: list[x509.Certificate]) -> dt.datetime:
    start = max(c.not_valid_before_utc for c in certs)
    end = min(c.not_valid_after_utc for c in certs)
    return start + (end - start) / 2


@cache
def badssl_cases() -> list[Case]:
    cases = []
    for path in sorted(BADSSL.glob("*.pem")):
        text = path.read_text()
        certs = _load_certs(text)
        trust = (certs[-1].public_bytes(serialization.Encoding.PEM).decode(),)
        at = _window_middle(certs)
        case = Case(
            id=path.name,
            name="sso_issuer",
            certificate=text,
            key=None,
            trust=trust if len(certs) > 1 else (),
            at=at,
            expect=BADSSL_EXPECT.get(path.name, "accept"),
        )
        cases.append(case)
        if path.name in ("wildcard-expired.pem", "subdomain-10000-sans.pem"):
            after = certs[0].not_valid_after_utc + dt.timedelta(seconds=1)
            cases.append(
                Case(**{**case.__dict__, "id": f"{path.name}@notAfter+1s", "at": after,
                        "expect": "certificate_expired"})
            )  # fmt: skip
    return cases


@pytest.mark.parametrize("case", _params(badssl_cases()))
def test_badssl(case: Case) -> None:
    _check(case)


# --- Certificate Transparency test data --------------------------------------------------------
# A 2012 RSA-1024 PKI: every key is weak, the CA keys are encrypted (password1), and a few
# historical oddities (MD2, a CA without basicConstraints, a leaf "issuing" a leaf).

CT = CORPORA / "ct-testdata" / "testdata"
CT_AT = dt.datetime(2015, 1, 1, tzinfo=dt.UTC)
CT_PLAIN_PAIRS = [
    "test", "test-embedded", "test-embedded-with-intermediate",
    "test-embedded-with-intermediate-preca", "test-embedded-with-preca",
    "test-intermediate", "test-no-ca",
]  # fmt: skip
CT_ENCRYPTED_PAIRS = ["ca", "ca-pre", "intermediate", "intermediate-pre"]


def _ct_file(name: str) -> str:
    return (CT / name).read_text()


def _decrypted(name: str) -> str:
    key = serialization.load_pem_private_key(_ct_file(name).encode(), b"password1")
    return pki.key_to_pem(key)


@cache
def ct_cases() -> list[Case]:
    ca = (_ct_file("ca-cert.pem"),)
    cases = [
        Case(f"{p}-cert.pem+key", "proxy", _ct_file(f"{p}-cert.pem"),
             _ct_file(f"{p}-key.pem"), ca, CT_AT, "weak_key")
        for p in CT_PLAIN_PAIRS
    ]  # fmt: skip
    for p in CT_ENCRYPTED_PAIRS:
        cert = _ct_file(f"{p}-cert.pem")
        key = _ct_file(f"{p}-key.pem")
        cases.append(Case(f"{p}-cert.pem+encrypted-key", "proxy", cert, key, ca, CT_AT,
                          "encrypted_key"))  # fmt: skip
        cases.append(Case(f"{p}-cert.pem+key-decrypted-with-password1", "proxy", cert,
                          _decrypted(f"{p}-key.pem"), ca, CT_AT, "weak_key"))  # fmt: skip
    md2 = _load_certs(_ct_file("test-md2-chain.pem"))
    verisign = _ct_file("test-colliding-root1.pem")
    for name, expect in [
        ("test-no-bc-cert-chain.pem", "not_a_ca"),
        ("test-no-ca-cert-chain.pem", "not_a_ca"),
        ("test-issuer-collision-chain.pem", "insecure_signature"),
    ]:
        certs = _load_certs(_ct_file(name))
        top = (certs[-1].public_bytes(serialization.Encoding.PEM).decode(),)
        cases.append(
            Case(name, "sso_issuer", _ct_file(name), None, top, _window_middle(certs), expect)
        )
    cases += [
        Case("test-md2-chain.pem/md2-intermediate", "sso_issuer",
             md2[1].public_bytes(serialization.Encoding.PEM).decode(), None, (verisign,),
             _window_middle(md2[1:]), "insecure_signature"),
        Case("test-corrupted.pem", "sso_issuer", _ct_file("test-corrupted.pem"), None, ca,
             CT_AT, "invalid_certificate"),
        Case("test-cert-chain.pem/bad-rsa-exponent", "sso_issuer",
             _ct_file("test-cert-chain.pem"), None, ca, CT_AT, "invalid_certificate"),
        Case("ca-cert.pem/serial-0-sha1-self-signed", "sso_issuer", _ct_file("ca-cert.pem"),
             None, (), CT_AT, "insecure_signature"),
        Case("test-colliding-roots.pem/v1-roots-as-ca-bundle", "mtls_trusted_ca",
             _ct_file("test-colliding-roots.pem"), None, (), CT_AT, "not_a_ca"),
        Case("google-cert.pem/expired", "sso_issuer", _ct_file("google-cert.pem"), None, (),
             CT_AT, "certificate_expired"),
    ]  # fmt: skip
    return cases


@pytest.mark.parametrize("case", _params(ct_cases()))
def test_ct_testdata(case: Case) -> None:
    _check(case)


# --- accounting --------------------------------------------------------------------------------

# Mirrored in docs/validation.md ("Corpus results"); update both together.
EXPECTED_COUNTS = {
    "x509-limbo": {"run": 134, "deviation": 17, "excluded": 138},
    "chromium": {"run": 62, "deviation": 24, "excluded": 111},
    "badssl": {"run": 31, "deviation": 0, "excluded": 0},
    "ct-testdata": {"run": 24, "deviation": 0, "excluded": 0},
}


def _counts(cases: list[Case]) -> dict[str, int]:
    tally: Counter[str] = Counter(
        "excluded" if c.excluded else "deviation" if c.deviation else "run" for c in cases
    )
    return {k: tally[k] for k in ("run", "deviation", "excluded")}


def _all() -> Iterator[tuple[str, list[Case]]]:
    yield "x509-limbo", limbo_cases()
    yield "chromium", chromium_cases()
    yield "badssl", badssl_cases()
    yield "ct-testdata", ct_cases()


def test_accounting() -> None:
    """Every case runs, or is excluded with a reason; the totals match the documentation."""
    for corpus, cases in _all():
        assert len({c.id for c in cases}) == len(cases), f"{corpus}: duplicate ids"
        assert _counts(cases) == EXPECTED_COUNTS[corpus], corpus
        both = [c.id for c in cases if c.excluded and c.deviation]
        assert not both, f"{corpus}: excluded cases cannot also be deviations: {both}"
    known = {c.id for c in limbo_cases()} | {c.id for c in chromium_cases()}
    stale = (set(LIMBO_DEVIATIONS) | set(CHROMIUM_DEVIATIONS)) - known
    assert not stale, f"deviations for cases that no longer exist: {stale}"
