"""SIGTERM to an agent stops what it supervises: no redis-server is left behind (orphaned
processes are re-parented to PID 1, so an orphan would show up as a live PID)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from clusterkit import wait_until
from conftest import start_cluster

pytestmark = pytest.mark.cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; only its parent has yet to reap it.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_supervised_redis(
    tmp_path_factory: pytest.TempPathFactory, signum: signal.Signals
) -> None:
    cluster = start_cluster(tmp_path_factory, 1)
    try:
        node = cluster.nodes[0]
        assert node.process is not None
        redis_pid = wait_until(lambda: node.redis_pid, what="redis-server's pid file")
        assert _parent(redis_pid) == node.process.pid  # the agent supervises it
        node.process.send_signal(signum)
        code = node.process.wait(timeout=30)
        # The agent exits on its own (not killed by the re-raised signal) once redis stopped.
        assert code == 0, f"agent exit status {code}"
        deadline = time.monotonic() + 10
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(redis_pid), (
            f"redis-server {redis_pid} outlived its agent (parent now {_parent(redis_pid)})"
        )
    finally:
        cluster.stop()
        pid = cluster.nodes[0].redis_pid if cluster.nodes else None
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
