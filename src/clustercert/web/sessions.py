"""Console login sessions: server-side, in memory, keyed by a random id in a cookie.

A session holds who logged in, its CSRF token and when it ends; nothing else. The cookie is
``HttpOnly; Secure; SameSite=Strict`` with the ``__Host-`` prefix (no Domain, Path=/), and the
session ends ``lifetime`` seconds after login whatever happens (no sliding renewal). Sessions live
in this process only: a control plane restart logs everyone out (docs/decisions.md).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from clustercert.errors import ClusterCertError

__all__ = ["COOKIE", "CsrfRejected", "Session", "SessionStore"]

COOKIE = "__Host-clustercert_console"


class CsrfRejected(ClusterCertError):
    """A state-changing console request without its session's CSRF token."""

    error_code = "csrf_token_invalid"
    http_status = 403


@dataclass(frozen=True)
class Session:
    session_id: str
    email: str
    csrf_token: str
    expires: float  # on the store's monotonic clock

    def check_csrf(self, token: str | None) -> None:
        """Raise :class:`CsrfRejected` unless ``token`` is this session's (constant time)."""
        if not token or not hmac.compare_digest(token.encode(), self.csrf_token.encode()):
            raise CsrfRejected(
                "the form's security token is missing or stale; reload the page and try again"
            )


class SessionStore:
    """At most ``max_sessions`` live sessions (the oldest is dropped first), each ending
    ``lifetime`` seconds after it began. Thread-safe."""

    def __init__(
        self,
        *,
        lifetime: float = 8 * 3600,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}  # insertion order: oldest first
        self._lock = threading.Lock()

    def create(self, email: str) -> Session:
        """A new session for ``email`` (a fresh id at every login: no session fixation)."""
        now = self._clock()
        session = Session(
            secrets.token_urlsafe(32), email, secrets.token_urlsafe(32), now + self.lifetime
        )
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= self._max:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (unknown, ended or logged out)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire(self, now: float) -> None:
        # Sessions are created in time order and share one lifetime: the expired ones are first.
        for session_id, session in list(self._sessions.items()):
            if session.expires > now:
                break
            del self._sessions[session_id]
