"""Users, roles and HTTP Basic authentication (DESIGN §8).

Passwords are stored as scrypt hashes with a per-user salt and compared in constant time. A
successful check is remembered for a short while (keyed by an HMAC of the credentials, never the
password itself) so that scrypt's deliberate cost is paid once per client, not per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from clustercert.errors import InsufficientPermissions, Unauthorized

__all__ = [
    "ROLES",
    "Authenticator",
    "User",
    "hash_password",
    "verify_password",
]

VIEW = "view_cluster_info"
UPDATE = "update_cluster"
MANAGE_USERS = "manage_users"

ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({VIEW, UPDATE, MANAGE_USERS}),
    "cluster_member": frozenset({VIEW}),
    "cluster_viewer": frozenset({VIEW}),
    "db_member": frozenset({VIEW}),
    "db_viewer": frozenset({VIEW}),
    "user_manager": frozenset({VIEW, MANAGE_USERS}),
}

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encoded = [base64.b64encode(v).decode() for v in (salt, digest)]
    return f"scrypt${_N}${_R}${_P}${encoded[0]}${encoded[1]}"


def verify_password(password: str, stored: str) -> bool:
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


@dataclass(frozen=True)
class User:
    uid: int
    email: str
    name: str
    role: str
    password_hash: str

    @property
    def permissions(self) -> frozenset[str]:
        return ROLES.get(self.role, frozenset())

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise InsufficientPermissions(
                f"user {self.email} (role {self.role}) lacks the permission {permission}"
            )


class Authenticator:
    """Checks HTTP Basic credentials against the users that ``find_user`` returns."""

    def __init__(
        self,
        find_user: Callable[[str], User | None],
        *,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._find_user = find_user
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._secret = os.urandom(32)
        self._cache: dict[bytes, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def authenticate_basic(self, header: str | None) -> User:
        if not header or not header.lower().startswith("basic "):
            raise Unauthorized("authentication required: send HTTP Basic credentials")
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            email, _, password = decoded.partition(":")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("malformed HTTP Basic credentials") from None
        return self.authenticate(email, password)

    def authenticate(self, email: str, password: str) -> User:
        user = self._find_user(email)
        fingerprint = hmac.new(
            self._secret, f"{email}\0{password}\0{user.password_hash if user else ''}".encode(),
            hashlib.sha256,
        ).digest()  # fmt: skip
        now = self._clock()
        with self._lock:
            cached = self._cache.get(fingerprint)
        if user is not None and cached is not None and cached[0] > now:
            return user
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        if user is None or not ok:
            # One message for unknown users and wrong passwords: no enumeration.
            raise Unauthorized("wrong username or password")
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[fingerprint] = (now + self._cache_seconds, email)
        return user
