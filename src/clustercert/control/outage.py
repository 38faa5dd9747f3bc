"""How a store outage shows in the log: one line when the store stops answering, one summary
every ``summary_every`` seconds while it stays down, one line when it answers again.

The control plane's background loops (leadership, the reconciler, the listeners following the
store, the lifecycle and SAN keepers) all fail at once, every second, while the store is down.
Each reports here instead of logging its own traceback: a :class:`StoreError` already says in
one line which backend failed doing what, and the chain of exceptions under it (httpx, sockets)
adds nothing an operator can act on. Requests still answer 503 ``store_unavailable`` with that
line, as they always did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from clustercert.errors import StoreError

__all__ = ["StoreOutage"]

log = logging.getLogger("clustercert.store")


class StoreOutage:
    """Thread-safe; ``clock`` is monotonic seconds (injectable for tests); ``on_change(up)``
    is told of each change (the ``clustercert_store_up`` metric)."""

    def __init__(
        self,
        *,
        summary_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
        on_change: Callable[[bool], None] = lambda _up: None,
    ) -> None:
        self.summary_every = summary_every
        self.on_change = on_change
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._failures = 0
        self._last_reason = ""
        self._summary_at = 0.0

    @property
    def down(self) -> bool:
        with self._lock:
            return self._down_since is not None

    def failed(self, error: StoreError, what: str) -> None:
        """A call to the store failed while ``what`` (e.g. "following the leader key")."""
        reason = " ".join(error.description.split())  # one line, whatever the backend said
        now = self._clock()
        with self._lock:
            self._failures += 1
            self._last_reason = reason
            if self._down_since is None:
                self._down_since = now
                self._summary_at = now + self.summary_every
                self._log.error("store unavailable (%s): %s", what, reason)
                self.on_change(False)
            elif now >= self._summary_at:
                self._summary_at = now + self.summary_every
                self._log.error(
                    "store still unavailable after %.0f s (%d failed calls); last: %s",
                    now - self._down_since,
                    self._failures,
                    reason,
                )

    def answered(self) -> None:
        """A call to the store succeeded."""
        with self._lock:
            if self._down_since is None:
                return
            down_for = self._clock() - self._down_since
            failures = self._failures
            self._down_since, self._failures = None, 0
        self.on_change(True)
        self._log.warning(
            "store available again after %.1f s (%d failed calls meanwhile)", down_for, failures
        )
