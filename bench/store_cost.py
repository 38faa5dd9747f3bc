"""What one durable store write costs on this disk: the control plane records each node's
proof (``applied/<node>/<name>``) with one such write per node and rotation, serially."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["measure_store_put_ms"]


def measure_store_put_ms(count: int = 60, parent: Path | None = None) -> float:
    """Median wall time in ms of one ``put`` into a fresh SQLite store (WAL, synchronous=FULL:
    one fsync per commit), as the control plane's default store does it."""
    from clustercert.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory(prefix="clustercert-bench-store-", dir=parent) as tmp:
        store = SqliteStore(Path(tmp) / "store.db")
        try:
            times = []
            for i in range(count):
                start = time.perf_counter()
                store.put(f"applied/{i}/proxy", '{"generation": 1, "ok": true}' + " " * 300)
                times.append(time.perf_counter() - start)
        finally:
            store.close()
    return 1000 * statistics.median(times)
