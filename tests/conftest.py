from __future__ import annotations

from collections.abc import Iterator

import pytest

from clustercert.demo import DemoCluster, free_port

ADMIN_PASSWORD = "correct horse battery staple"


def start_cluster(
    tmp_path_factory: pytest.TempPathFactory, nodes: int = 3, *server_args: str
) -> DemoCluster:
    cluster = DemoCluster(
        tmp_path_factory.mktemp("cluster"),
        nodes_count=nodes,
        api_port=free_port(),
        console_port=free_port(),  # not the default 8443: tests run beside a demo, or each other
        admin_password=ADMIN_PASSWORD,
        server_args=tuple(server_args),
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
