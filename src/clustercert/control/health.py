"""Whether each node answers: what ``GET /v1/nodes`` shows as ``reachable`` and ``last_seen``.

The reconciler asks every node for its status every pass (and probes nodes in backoff); each
answer, or failure, is recorded here, in the memory of the control plane that runs the
reconciler: the leader (:mod:`.leader`). The leader writes a :meth:`NodeHealth.snapshot` to
the store when it changes (not per answer: a write per node per second would cost the store
more than the information is worth) and the other control planes :meth:`NodeHealth.load` it,
so every control plane shows the same. A control plane that becomes the leader starts from the
last snapshot and corrects it on its first pass.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clustercert.clock import iso, parse_iso, utc_now

__all__ = ["NodeHealth", "Reachability"]


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    last_seen: str | None  # ISO 8601 (clustercert.clock), None if never heard from
    error: str | None = None  # why the last attempt failed, when it did


class NodeHealth:
    """Thread-safe record of the last contact with each node."""

    def __init__(self, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[int, dt.datetime] = {}
        self._down: dict[int, str] = {}
        self._changes = 0

    @property
    def changes(self) -> int:
        """How many times this record changed: a cheap check before a :meth:`snapshot`."""
        return self._changes

    def answered(self, node_id: int) -> None:
        """The node answered a call just now."""
        with self._lock:
            self._seen[node_id] = self._clock()
            self._down.pop(node_id, None)
            self._changes += 1

    def failed(self, node_id: int, error: str) -> None:
        """A call to the node failed (unreachable, timed out, or refused)."""
        with self._lock:
            self._down[node_id] = error
            self._changes += 1

    def forget(self, node_id: int) -> None:
        """The node left the cluster."""
        with self._lock:
            self._seen.pop(node_id, None)
            self._down.pop(node_id, None)
            self._changes += 1

    def snapshot(self) -> dict[str, Any]:
        """What this record knows, as JSON (``{"seen": {id: iso}, "down": {id: error}}``)."""
        with self._lock:
            return {
                "seen": {str(n): iso(t) for n, t in sorted(self._seen.items())},
                "down": {str(n): e for n, e in sorted(self._down.items())},
            }

    def load(self, snapshot: dict[str, Any]) -> None:
        """Replace what this record knows with a :meth:`snapshot` (another control plane's)."""
        seen = {int(n): parse_iso(t) for n, t in snapshot.get("seen", {}).items()}
        down = {int(n): str(e) for n, e in snapshot.get("down", {}).items()}
        with self._lock:
            self._seen, self._down = seen, down
            self._changes += 1

    def of(self, node_id: int) -> Reachability:
        with self._lock:
            seen = self._seen.get(node_id)
            error = self._down.get(node_id)
        return Reachability(
            reachable=seen is not None and error is None,
            last_seen=iso(seen) if seen is not None else None,
            error=error,
        )
