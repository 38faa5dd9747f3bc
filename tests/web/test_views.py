"""What the console's pages show (web/views.py), read from a real cluster directory's SQLite
store with records written directly: expiry days and warning, and each node's badge state.
In-process; the browser tests (web/test_console.py) show the same rows on a running cluster."""

from __future__ import annotations

import datetime as dt
from asyncio import run
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from clustercert.clock import iso
from clustercert.control.directory import ClusterDirectory, init_cluster
from clustercert.control.state import AppliedRecord, ClusterState
from clustercert.names import NAMES
from clustercert.web.views import certificate_detail, certificate_rows, node_rows

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ClusterState]:
    init_cluster(
        tmp_path, name="cluster.local", admin_email="a@x", admin_password="pw-pw-pw-pw",
        now=NOW - dt.timedelta(days=1),
    )  # fmt: skip
    directory = ClusterDirectory(tmp_path)
    with directory.open_store() as store:
        yield directory.state(store)


def _expiring_in(state: ClusterState, name: str, delta: dt.timedelta) -> None:
    record = run(state.certificate(name))
    assert record is not None
    run(state.put_certificate(replace(record, not_after=iso(NOW + delta))))


def test_expiry_is_in_whole_days_and_warns_under_30(state: ClusterState) -> None:
    _expiring_in(state, "proxy", dt.timedelta(days=29, hours=23))
    _expiring_in(state, "syncer", dt.timedelta(days=30))
    _expiring_in(state, "api", -dt.timedelta(seconds=1))
    rows = {r.name: r for r in run(certificate_rows(state, NOW))}
    assert list(rows) == list(NAMES)
    assert (rows["proxy"].days_left, rows["proxy"].expiring) == (29, True)
    assert (rows["syncer"].days_left, rows["syncer"].expiring) == (30, False)
    assert rows["api"].days_left is not None and rows["api"].days_left < 0
    assert rows["api"].expiring
    assert not rows["ldap_client"].is_set and rows["ldap_client"].days_left is None


def test_badges_say_in_sync_lagging_or_failed_per_node(state: ClusterState) -> None:
    nodes = [
        run(state.add_node(f"node-{i}", f"https://127.0.0.1:{7000 + i}", NOW)) for i in (10, 2, 1)
    ]
    proxy = run(state.certificate("proxy"))
    assert proxy is not None
    proved = {"node-1": (proxy.generation, True), "node-2": (proxy.generation - 1, True),
              "node-10": (proxy.generation, False)}  # fmt: skip
    for node in nodes:
        generation, ok = proved[node.name]
        run(
            state.record_applied(
                node.node_id, "proxy", AppliedRecord(generation, proxy.fingerprint, ok, at=iso(NOW))
            )
        )
    row = next(r for r in run(certificate_rows(state, NOW)) if r.name == "proxy")
    # Natural name order, whatever order the nodes joined in.
    assert [(b.node, b.state) for b in row.badges] == [
        ("node-1", "in-sync"), ("node-2", "lagging"), ("node-10", "failed"),
    ]  # fmt: skip
    assert row.in_sync == 1
    api_row = next(r for r in run(certificate_rows(state, NOW)) if r.name == "api")
    assert {b.state for b in api_row.badges} == {"lagging"}  # nothing proved yet

    detail = run(certificate_detail(state, "proxy", NOW))
    assert [(p.badge.node, p.verified_at) for p in detail.nodes] == [
        ("node-1", iso(NOW)), ("node-2", iso(NOW)), ("node-10", iso(NOW)),
    ]  # fmt: skip
    assert detail.chain[0].fingerprint == proxy.fingerprint
    assert [n.node.name for n in run(node_rows(state))] == ["node-1", "node-2", "node-10"]
    assert not any(n.in_sync for n in run(node_rows(state)))
