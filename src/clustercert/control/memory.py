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

__all__ = ["Trimmer", "trimmer", "tune_allocator"]

log = logging.getLogger("clustercert.control.memory")

# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def tune_allocator() -> bool:
    """Keep large short-lived buffers out of the heap, and threads to two arenas (glibc only;
    False elsewhere). Every TLS read asks for a 256 KiB buffer (uvloop's ``SSL_READ_MAX_SIZE``)
    and shrinks it to what came; glibc's mmap threshold, raised past that size by the first
    such buffer freed, then serves them all from the heap, where a rollout's 1,000 answers at
    once leave it fragmented. A fixed threshold maps each one on its own and unmaps it when
    freed. The store's worker threads would otherwise each get an arena of their own."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(mallopt(_M_ARENA_MAX, 2))


def trimmer() -> Callable[[], int] | None:
    """``malloc_trim(0)`` of this process's C library, or None where there is none (musl,
    macOS)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
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
