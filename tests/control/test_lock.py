"""The cluster lock (src/clustercert/control/lock.py), without a cluster: who holds it and
whether that holder is gone, taking it over from a dead previous incarnation, waiting for a
live holder and then 409. Moved here from control/test_recovery_units.py, unchanged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clustercert.control.lock import (
    LOCK_TTL,
    ROLLOUT_LOCK,
    cluster_lock,
    holder_is_gone,
    lock_owner,
)
from clustercert.control.state import ClusterState
from clustercert.errors import UpdateInProgress
from clustercert.sealing import KeySealer
from clustercert.store import SqliteStore

# --- lock owners ----------------------------------------------------------------------------------


def _with(owner: str, **fields: str) -> str:
    """``owner`` with some of its HOST:BOOT:PID:START:ROLE fields replaced."""
    parts = owner.split(":")
    for index, name in enumerate(("host", "boot", "pid", "start", "role")):
        if name in fields:
            parts[index] = fields[name]
    return ":".join(parts)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_owner_names_this_process() -> None:
    owner = lock_owner("update")
    _host, _boot, pid, start, role = owner.split(":")
    assert pid == str(os.getpid())
    assert start.isdigit()
    assert role.startswith("update-")
    assert lock_owner("update") != owner  # one owner string per hold


def test_a_live_holder_is_not_gone() -> None:
    assert not holder_is_gone(lock_owner("update"))


def test_a_dead_process_of_this_host_is_gone() -> None:
    assert holder_is_gone(_with(lock_owner("update"), pid=str(_dead_pid()), start="1"))


def test_a_reused_pid_is_gone() -> None:
    # This process is alive, but it is not the one that started at tick 1.
    assert holder_is_gone(_with(lock_owner("update"), start="1"))


def test_an_earlier_boot_of_this_host_is_gone() -> None:
    assert holder_is_gone(_with(lock_owner("update"), boot="00000000"))


@pytest.mark.parametrize(
    "holder",
    ["other-host:abcd1234:1:1:update-00", "reconciler-1234", "", "a:b:c:d:e", "a:b:1:2"],
)
def test_another_host_or_an_unknown_owner_is_presumed_alive(holder: str) -> None:
    assert not holder_is_gone(holder)


def _state(tmp_path: Path) -> ClusterState:
    return ClusterState(SqliteStore(tmp_path / "store.db"), KeySealer(os.urandom(32)))


def test_cluster_lock_takes_over_from_a_dead_previous_incarnation(tmp_path: Path) -> None:
    state = _state(tmp_path)
    dead = _with(lock_owner("update"), pid=str(_dead_pid()), start="1")
    assert state.store.try_lock(ROLLOUT_LOCK, dead, LOCK_TTL)

    async def take() -> str:
        async with cluster_lock(state, 0.0) as owner:
            assert state.store.lock_holder(ROLLOUT_LOCK) == owner
            return owner

    owner = asyncio.run(take())
    assert owner != dead
    assert state.store.lock_holder(ROLLOUT_LOCK) is None  # released on exit
    state.store.close()


def test_cluster_lock_waits_for_a_live_holder_then_409(tmp_path: Path) -> None:
    state = _state(tmp_path)
    elsewhere = "other-host:abcd1234:1:1:update-00"
    assert state.store.try_lock(ROLLOUT_LOCK, elsewhere, LOCK_TTL)

    async def take() -> None:
        async with cluster_lock(state, 0.2):
            pass

    with pytest.raises(UpdateInProgress, match=r"holds the cluster lock; waited 0\.2 s"):
        asyncio.run(take())
    assert state.store.lock_holder(ROLLOUT_LOCK) == elsewhere
    state.store.close()
