"""Users, roles and authentication (DESIGN §8): HTTP Basic and client certificates.

Passwords are stored as scrypt hashes with a per-user salt and compared in constant time. An
unknown user costs the same scrypt run as a known one (against a dummy hash) and gets the same
answer, so neither timing nor messages tell which users exist. A successful check is remembered
for a short while (keyed by an HMAC of the credentials, never the password itself) so that
scrypt's deliberate cost is paid once per client, not per request.

Failed logins are logged (never the password) and throttled by :class:`LoginThrottle`: per
(source address, account) and per source address, a few failures are free, then every further
attempt must wait an exponentially growing delay; attempts made too early are refused without
checking the password, which also keeps scrypt from being turned into a CPU-exhaustion lever.
Failures of one account from all sources together only hold back wrong answers: an outsider's
guessing never makes the real user's correct password fail.

Client-certificate login (``auth_method: "certificate"``) is on once ``mtls_trusted_ca`` is set:
the TLS handshake proves the client holds the certificate's key; :meth:`Authenticator.
authenticate_certificate` then checks, on every request and against the *current* bundle, that a
CA of ``mtls_trusted_ca`` issued it, that it is valid now and allows clientAuth, and that its
subject (RFC 2253, as Redis Enterprise compares it) is some user's ``certificate_subject_line``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from clustercert import pki
from clustercert.clock import utc_now
from clustercert.control.state import User
from clustercert.errors import Unauthorized

__all__ = [
    "Authenticator",
    "LoginThrottle",
    "canonical_subject",
    "client_certificate",
    "hash_password",
    "verify_password",
]

log = logging.getLogger("clustercert.auth")

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encoded = [base64.b64encode(v).decode() for v in (salt, digest)]
    return f"scrypt${_N}${_R}${_P}${encoded[0]}${encoded[1]}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` result. A stored
    value that is not such a hash (e.g. ``""`` for certificate users) never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    computed = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


# Compared against when the user does not exist, so that unknown and known users cost the same.
_DUMMY_HASH = hash_password(os.urandom(8).hex())


def _split_unescaped(text: str, separators: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char in separators:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def canonical_subject(line: str) -> str:
    """The RFC 4514/2253 form of a distinguished name, as ``rfc4514_string()`` prints a
    certificate's subject. Accepts what operators write for Redis Enterprise's
    ``certificate_subject_line`` ("CN=alice, OU=ops, O=Example, C=US": spaces after separators,
    ``;`` as a separator, lower-case attribute types). Raises ``ValueError`` when it is not a DN.

    Attribute values are compared exactly (case included): the operator's CA decides subjects.
    """
    rdns = []
    for rdn in _split_unescaped(line, ",;"):
        attributes = []
        for attribute in _split_unescaped(rdn, "+"):
            kind, sep, value = attribute.partition("=")
            if not sep or not kind.strip() or not value.strip():
                raise ValueError(f"{attribute.strip()!r} is not TYPE=value")
            attributes.append(f"{kind.strip().upper()}={value.strip()}")
        rdns.append("+".join(attributes))
    name = x509.Name.from_rfc4514_string(",".join(rdns))
    return name.rfc4514_string()


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed-login bookkeeping (thread-safe), built so that an outsider's guessing can slow
    itself down but never lock the real user out.

    Three counters, each forgetting ``window`` seconds after its last failure:

    - per (source address, account): the first ``free_per_account`` failures are free, then
      each attempt must come at least ``base_delay * 2**(failures - free)`` seconds (at most
      ``max_delay``) after the last failure, or it is refused without a check;
    - per source address, over all accounts (password spraying): the same after
      ``free_per_source`` failures;
    - per account, over all sources (distributed guessing): after ``free_account_wide``
      failures the same schedule gives :meth:`account_wait`. It never refuses an attempt — the
      password is checked and a correct one logs in — but a *wrong* answer is held back for
      that long, so other sources' failures can only slow other failures.

    Refused attempts do not count as failures. A success clears the (source, account) record.
    Unknown accounts are tracked exactly like known ones, so the throttle tells nothing about
    which exist. At most ``max_entries`` records are kept (oldest dropped first), so arbitrary
    account names and addresses cannot exhaust memory.
    """

    def __init__(
        self,
        *,
        free_per_account: int = 5,
        free_per_source: int = 100,
        free_account_wide: int = 20,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        window: float = 900.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = {
            "pair": free_per_account, "source": free_per_source, "account": free_account_wide
        }  # fmt: skip
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._window = window
        self._max_entries = max_entries
        self._clock = clock
        self._records: dict[tuple[str, ...], _Failures] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(email: str, source: str) -> list[tuple[str, ...]]:
        account = email.lower()
        return [("pair", source, account), ("source", source), ("account", account)]

    def _live(self, key: tuple[str, ...], now: float) -> _Failures | None:
        record = self._records.get(key)
        if record is not None and now - record.last > self._window:
            del self._records[key]
            return None
        return record

    def _wait(self, keys: list[tuple[str, ...]]) -> float:
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                record = self._live(key, now)
                if record is None:
                    continue
                over = record.count - self._free[key[0]]
                if over >= 0:
                    delay = min(self._base_delay * 2 ** min(over, 30), self._max_delay)
                    wait = max(wait, record.last + delay - now)
        return wait

    def wait_seconds(self, email: str, source: str) -> float:
        """How long this source must still wait before its attempt on this account may be
        checked (0: now). Other sources' failures never count here."""
        return self._wait(self._keys(email, source)[:2])

    def account_wait(self, email: str) -> float:
        """How long a wrong password for this account is held back (0: not at all), from the
        failures of all sources together."""
        return self._wait(self._keys(email, "")[2:])

    def failed(self, email: str, source: str) -> int:
        """Record a failure; return this source's failure count on this account."""
        now = self._clock()
        with self._lock:
            counts = []
            for key in self._keys(email, source):
                record = self._live(key, now)
                if record is None:
                    if len(self._records) >= self._max_entries:
                        oldest = min(self._records, key=lambda k: self._records[k].last)
                        del self._records[oldest]
                    record = self._records[key] = _Failures(0, now)
                record.count += 1
                record.last = now
                counts.append(record.count)
            return counts[0]

    def __len__(self) -> int:
        """How many records (source-account pairs, sources, accounts) are being tracked."""
        return len(self._records)

    def succeeded(self, email: str, source: str) -> None:
        with self._lock:
            self._records.pop(self._keys(email, source)[0], None)


def client_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The client certificate of the connection, from the ASGI TLS extension
    (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first) or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return x509.load_pem_x509_certificate(str(chain[0]).encode())


async def _nobody(subject: str) -> User | None:
    return None


async def _no_bundle() -> str | None:
    return None


class Authenticator:
    """Authenticates API requests: HTTP Basic against ``find_user``, or a client certificate
    against the bundle ``trusted_client_cas`` returns (PEM, or None when certificate login is
    off) and the users ``find_certificate_user`` maps a subject to."""

    def __init__(
        self,
        find_user: Callable[[str], Awaitable[User | None]],
        *,
        find_certificate_user: Callable[[str], Awaitable[User | None]] = _nobody,
        trusted_client_cas: Callable[[], Awaitable[str | None]] = _no_bundle,
        throttle: LoginThrottle | None = None,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._find_user = find_user
        self._sleep = sleep
        self._find_certificate_user = find_certificate_user
        self._trusted_client_cas = trusted_client_cas
        # Not `throttle or ...`: an empty throttle has len() 0, so it is falsy.
        self.throttle = throttle if throttle is not None else LoginThrottle(clock=clock)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._secret = os.urandom(32)
        self._cache: dict[bytes, float] = {}  # credentials HMAC -> valid until
        self._lock = threading.Lock()
        self._cas: tuple[str, list[x509.Certificate]] = ("", [])

    async def authenticate_scope(self, scope: Mapping[str, Any]) -> User:
        """The user an ASGI HTTP request authenticates as: HTTP Basic when the request sends an
        Authorization header, else its client certificate. Raises :class:`Unauthorized`."""
        header = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        client = scope.get("client")
        source = str(client[0]) if client else "unknown"
        if header is None:
            leaf = client_certificate(scope)
            if leaf is not None:
                return await self.authenticate_certificate(leaf)
        return await self.authenticate_basic(header, source=source)

    async def authenticate_basic(self, header: str | None, *, source: str = "unknown") -> User:
        if not header or not header.lower().startswith("basic "):
            raise Unauthorized(
                "authentication required: send HTTP Basic credentials (or a client certificate "
                "once mtls_trusted_ca is set)"
            )
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            email, _, password = decoded.partition(":")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("malformed HTTP Basic credentials") from None
        return await self.authenticate(email, password, source=source)

    async def authenticate(self, email: str, password: str, *, source: str = "unknown") -> User:
        user = await self._find_user(email)
        fingerprint = hmac.new(
            self._secret, f"{email}\0{password}\0{user.password_hash if user else ''}".encode(),
            hashlib.sha256,
        ).digest()  # fmt: skip
        now = self._clock()
        with self._lock:
            cached = self._cache.get(fingerprint)
        if user is not None and cached is not None and cached > now:
            return user
        wait = self.throttle.wait_seconds(email, source)
        if wait > 0:
            log.warning(
                "login for %s from %s refused without a check: too many recent failures "
                "(%.0f s to wait)", ascii(email[:128]), source, wait,
            )  # fmt: skip
            raise Unauthorized(
                f"too many failed logins from this address; try again in {max(1, round(wait))} s"
            )
        # scrypt is deliberately slow (tens of ms): never on the event loop.
        ok = await asyncio.to_thread(
            verify_password, password, user.password_hash if user else _DUMMY_HASH
        )
        if user is None or not ok:
            held = self.throttle.account_wait(email)
            failures = self.throttle.failed(email, source)
            log.warning(
                "failed login for %s from %s (%d failures in a row from there)",
                ascii(email[:128]), source, failures,
            )  # fmt: skip
            if held > 0:
                # Many sources are guessing this account: slow the wrong answers down. A right
                # password never waits here, so this cannot lock the real user out.
                log.warning(
                    "failed logins for %s from many sources: wrong answers held back %.0f s",
                    ascii(email[:128]), held,
                )  # fmt: skip
                await self._sleep(held)
            # One message for unknown users and wrong passwords: no enumeration.
            raise Unauthorized("wrong username or password")
        self.throttle.succeeded(email, source)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[fingerprint] = now + self._cache_seconds
        return user

    async def _client_cas(self) -> list[x509.Certificate]:
        bundle = await self._trusted_client_cas()
        if not bundle:
            return []
        if self._cas[0] != bundle:
            self._cas = (bundle, x509.load_pem_x509_certificates(bundle.encode()))
        return self._cas[1]

    async def authenticate_certificate(self, leaf: x509.Certificate) -> User:
        """The certificate user whose ``certificate_subject_line`` is this client certificate's
        subject. The TLS handshake has proved possession of its key; this checks it against the
        current ``mtls_trusted_ca`` (so a replaced or removed bundle takes effect at once, even on
        open or resumed connections)."""
        cas = await self._client_cas()
        if not cas:
            raise Unauthorized(
                "client-certificate login is off (mtls_trusted_ca is not set); use HTTP Basic"
            )
        subject = leaf.subject.rfc4514_string()
        now = self._wall_clock()
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise Unauthorized(f"the client certificate {subject!r} is expired or not yet valid")
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = None
        if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise Unauthorized(f"the client certificate {subject!r} does not allow clientAuth")
        if not any(pki.is_issued_by(leaf, ca) for ca in cas):
            raise Unauthorized(
                f"the client certificate {subject!r} was not issued by a CA of mtls_trusted_ca"
            )
        user = await self._find_certificate_user(subject)
        if user is None:
            log.warning("certificate login with subject %s matches no user", ascii(subject))
            raise Unauthorized(
                f"no user logs in with the certificate subject {subject!r}: create one with "
                'auth_method "certificate" and this certificate_subject_line'
            )
        return user
