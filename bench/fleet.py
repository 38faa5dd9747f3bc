"""A benchmark cluster: the demo cluster's processes (control plane, agents, redis-servers) on
loopback, and the one call being measured, ``PUT /v1/cluster/update_cert`` for ``proxy``."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import procstat
from bench.baseline import NodeTarget
from bench.certs import LeafPair
from clustercert.demo import DemoCluster, free_port

__all__ = ["BenchCluster", "RotationFailed", "running_cluster"]


class RotationFailed(Exception):
    """The control plane did not answer 200; the message carries its answer."""


@dataclass
class BenchCluster:
    demo: DemoCluster
    client: httpx.Client

    @property
    def size(self) -> int:
        return len(self.demo.nodes)

    @property
    def server_pid(self) -> int:
        assert self.demo.server is not None
        return self.demo.server.pid

    def agent_pids(self) -> list[int]:
        return [n.process.pid for n in self.demo.nodes if n.process is not None]

    def redis_pids(self) -> list[int]:
        return [pid for n in self.demo.nodes if (pid := n.redis_pid) is not None]

    def targets(self) -> list[NodeTarget]:
        return [
            NodeTarget(n.name, n.directory, n.directory / "redis.sock", n.redis_port)
            for n in self.demo.nodes
        ]

    @property
    def ca_file(self) -> Path:
        return self.demo.cluster.ca_file

    def rotate(self, leaf: LeafPair) -> float:
        """One ``update_cert`` of ``proxy``; returns its wall time in seconds."""
        body = {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
        start = time.perf_counter()
        response = self.client.put("/v1/cluster/update_cert", json=body)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RotationFailed(f"update_cert answered {response.status_code}: {response.text}")
        served = {n.get("served_fingerprint") for n in response.json().get("nodes", [])}
        if served != {leaf.fingerprint}:
            raise RotationFailed(f"200, but the nodes report serving {served}")
        return elapsed


@contextlib.contextmanager
def running_cluster(
    nodes: int, parent: Path | None = None, server_args: tuple[str, ...] = ()
) -> Iterator[BenchCluster]:
    """Start a cluster of ``nodes`` nodes in a fresh directory; stop every process and remove
    the directory on the way out, whatever happened."""
    directory = Path(tempfile.mkdtemp(prefix=f"clustercert-bench-{nodes}-", dir=parent))
    demo = DemoCluster(
        directory,
        nodes_count=nodes,
        api_port=free_port(),
        console_port=free_port(),  # not 8443: bench.compare runs two clusters side by side
        admin_password=secrets.token_urlsafe(16),
        server_args=server_args,
    )
    started = False
    try:
        demo.start(wait=60.0 + 3.0 * nodes)
        started = True
        with demo.client(timeout=120.0) as client:
            yield BenchCluster(demo, client)
    finally:
        redis_pids = [pid for n in demo.nodes if (pid := n.redis_pid) is not None]
        demo.stop()
        _wait_gone(redis_pids, timeout=10.0)
        if started:
            shutil.rmtree(directory, ignore_errors=True)
        else:  # the error names a log in it: keep them
            print(f"the cluster did not start; its logs stay in {directory}", file=sys.stderr)


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` runs (the agents' redis-servers stop on SIGTERM, after the
    agents), so that nothing writes into the directory while it is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(procstat.is_running(pid) for pid in pids):
        time.sleep(0.05)
