"""The cluster lock: one certificate update (or reconciler pass) at a time, cluster-wide.

A lease in the store (LOCK_TTL, refreshed while held). Its owner string names the process
that holds it, so that a control plane restarted on the same host can see that the holder is
a previous incarnation that died (kill -9, OOM, power) and take the lock over at once instead
of waiting for the lease to run out. See docs/decisions.md ("Taking over the cluster lock").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from clustercert.control.state import ClusterState
from clustercert.errors import UpdateInProgress

__all__ = ["LOCK_TTL", "ROLLOUT_LOCK", "cluster_lock", "holder_is_gone", "lock_owner"]

log = logging.getLogger("clustercert.rollout")

ROLLOUT_LOCK = "rollout"
LOCK_TTL = 10.0  # shorter than any --lock-wait worth having: a dead holder never refuses an update


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8] or "-"
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None when no
    such process runs. A zombie counts as gone. "-" where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "-"
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may contain spaces
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else "-"


_HOST = socket.gethostname().replace(":", "_") or "localhost"
_BOOT = _boot_id()


def lock_owner(role: str) -> str:
    """A unique owner string for one hold of the cluster lock by this process:
    ``HOST:BOOT:PID:START:ROLE-RANDOM`` (START: the process's start time in ticks, which tells
    a reused pid from the original)."""
    pid = os.getpid()
    return f"{_HOST}:{_BOOT}:{pid}:{_start_ticks(pid) or '-'}:{role}-{secrets.token_hex(4)}"


def holder_is_gone(holder: str) -> bool:
    """True only when ``holder`` (a :func:`lock_owner` string) provably no longer runs: it was
    a process of this host that is gone, or of an earlier boot of this host. Anything else
    (another host, an unknown format, a live process) is presumed alive: its lease expires."""
    parts = holder.split(":")
    if len(parts) != 5 or parts[0] != _HOST or not parts[2].isdigit():
        return False
    boot, pid, started = parts[1], int(parts[2]), parts[3]
    if boot != _BOOT:
        return boot != "-" and _BOOT != "-"
    now = _start_ticks(pid)
    if now is None:
        return True
    return now != "-" and started != "-" and now != started  # the pid was reused


@contextlib.asynccontextmanager
async def cluster_lock(
    state: ClusterState,
    wait: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    *,
    role: str = "update",
) -> AsyncIterator[str]:
    """Hold the cluster-wide update lock; wait at most ``wait`` seconds, then 409.

    The lock is a lease refreshed while held, so a crashed holder releases it after LOCK_TTL;
    a holder that :func:`holder_is_gone` says is dead is taken over at once."""
    owner = lock_owner(role)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not await state.try_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
        holder = await state.lock_holder(ROLLOUT_LOCK)
        if holder is not None and holder_is_gone(holder):
            log.warning(
                "the cluster lock is held by %s, a control plane process of this host that no "
                "longer runs; taking it over",
                holder,
            )
            await state.unlock(ROLLOUT_LOCK, holder)  # only if it still holds it: atomic
            if await state.try_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
                break
        if loop.time() >= deadline:
            raise UpdateInProgress(
                f"another certificate update holds the cluster lock; waited {wait:g} s. "
                "Retry when it has finished."
            )
        await sleep(0.05)

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            if not await state.refresh_lock(ROLLOUT_LOCK, owner, LOCK_TTL):
                log.error("lost the cluster lock (%s): its lease ran out", owner)

    refresher = asyncio.create_task(keep_alive())
    try:
        yield owner
    finally:
        refresher.cancel()
        await state.unlock(ROLLOUT_LOCK, owner)
