"""The control plane's periodic heap trim (control/memory.py): in-process, no cluster."""

from __future__ import annotations

import asyncio
import contextlib

from clustercert.control.memory import Trimmer, trimmer


def test_malloc_trim_is_found_and_runs() -> None:
    trim = trimmer()
    assert trim is not None  # the test machines run glibc
    assert trim() in (0, 1)


def test_the_trimmer_runs_until_cancelled_and_wakes_when_asked() -> None:
    async def run_briefly() -> None:
        trimming = Trimmer(interval=0.01)
        task = asyncio.create_task(trimming.run_forever())
        await asyncio.sleep(0.05)
        trimming.soon()  # a rollout ended
        await asyncio.sleep(0.05)
        assert not task.done()  # it keeps going; nothing it did raised
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(run_briefly())
