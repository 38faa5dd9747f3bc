from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from clustercert.demo import PORT_SLICE_ENV, DemoCluster, free_port

ADMIN_PASSWORD = "correct horse battery staple"

# `make test` runs the suite on pytest-xdist workers (gw0, gw1, ...): each picks listening
# ports from its own slice of the range, so that two workers never pick the same one; the
# processes they start (a `clustercert demo`) inherit the slice.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[PORT_SLICE_ENV] = (
        f"{int(worker.removeprefix('gw'))}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"
    )


def start_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    nodes: int = 3,
    *server_args: str,
    redis: str = "replicated",
    **options: Any,
) -> DemoCluster:
    """A running DemoCluster on free ports; ``options`` go to DemoCluster (e.g.
    ``internal_validity``)."""
    cluster = DemoCluster(
        tmp_path_factory.mktemp("cluster"),
        nodes_count=nodes,
        api_port=free_port(),
        console_port=free_port(),  # not the default 8443: tests run beside a demo, or each other
        admin_password=ADMIN_PASSWORD,
        server_args=tuple(server_args),
        redis=redis,
        **options,
    )
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    """A 3-node cluster shared by the tests that leave it in sync; tests must not assume which
    certificate it serves, only compare before and after."""
    running = start_cluster(tmp_path_factory)
    yield running
    running.stop()


# Fixtures that start processes (control plane, agents, redis-server, etcd, a browser): a test
# that uses one, directly or through another fixture, is a `cluster` test, so that
# `pytest -m "not cluster"` is the fast in-process loop. Modules whose tests start processes
# in their own bodies say so with `pytestmark = pytest.mark.cluster`.
PROCESS_FIXTURES = frozenset(
    {
        "cluster", "ctx", "fuzzed_cluster", "fault_cluster", "mixed_cluster", "small_cluster",
        "paused_cluster", "etcd_server", "etcd", "browser",
    }
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_etcd = callspec is not None and callspec.params.get("backend") == "etcd"
        if fixtures & PROCESS_FIXTURES or on_etcd:
            item.add_marker(pytest.mark.cluster)
