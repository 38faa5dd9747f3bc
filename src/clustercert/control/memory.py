"""Give the heap's free memory back to the system now and then (glibc's ``malloc_trim``).

A rollout to N nodes holds N TLS connections' buffers and N requests and answers at once; joins
and the first sync of a large fleet do the same. Python frees them afterwards, but glibc keeps
the freed pages in its heap unless they sit at its very top, so the control plane's RSS stays
at its busiest moment (measured at 1,000 hollow nodes: hundreds of MiB, docs/benchmarks.md).
``malloc_trim(0)`` returns every free page, wherever it is. It costs a few milliseconds, in a
worker thread, after each rollout and once per interval; without glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["Trimmer", "trimmer"]

log = logging.getLogger("clustercert.control.memory")


def trimmer() -> Callable[[], int] | None:
    """``malloc_trim(0)`` of this process's C library, or None where there is none (musl,
    macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))  # 1 when memory was returned


class Trimmer:
    """Trims every ``interval`` seconds, and soon after :meth:`soon` (a rollout has ended)."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._wake = asyncio.Event()

    def soon(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        trim = trimmer()
        if trim is None:
            log.debug("no malloc_trim here: freed heap memory stays with the process")
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await asyncio.to_thread(trim)
