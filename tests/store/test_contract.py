"""The store contract (DESIGN §9), run against every backend: SQLite and a real etcd.

Every test taking ``backend`` or ``store`` runs once per backend. The etcd half starts a real
etcd server (Debian's etcd-server) once per session; it fails, rather than skips, where etcd is
missing. Each etcd test works under its own key prefix. Lock expiry uses an injected clock on
SQLite and a real 1 s lease on etcd (waited for with a bounded poll; nothing asserts durations).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from store_fixtures import EtcdProcess, FakeClock, dying_member, free_ports, not_etcd

from clustercert.errors import ConfigError, StoreConflict, StoreError
from clustercert.store import (
    Delete,
    Entry,
    EtcdStore,
    Put,
    SqliteStore,
    Store,
    open_store,
)

LONG_TTL = 60.0  # a lock that must not expire during a test
SHORT_TTL = 1.0  # a lock the test lets expire
EXPIRY_DEADLINE = 20.0  # etcd checks leases every 500 ms; this only bounds a broken run


# --- backends --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server: EtcdProcess | None = None
    failures: list[str] = []
    for _ in range(3):  # another process may grab a port between picking and binding it
        try:
            server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
            break
        except RuntimeError as exc:
            failures.append(str(exc))
            if "needs an etcd server binary" in str(exc):
                break
    if server is None:
        # Fail, never skip: the Makefile installs etcd, so a missing one is a broken machine.
        pytest.fail("\n\n".join(failures), pytrace=False)
    yield server
    server.stop()


@dataclass
class Backend:
    """How a test gets stores of one backend that share one set of data."""

    name: str
    factory: Callable[[], Store]
    let_expire: Callable[[Store, str], None]
    """Make lock ``name``, taken with :data:`SHORT_TTL` and not refreshed since, expire."""
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = self.factory()
        self.opened.append(store)
        return store


def wait_for_release(store: Store, name: str) -> None:
    deadline = time.monotonic() + EXPIRY_DEADLINE
    while store.lock_holder(name) is not None:
        if time.monotonic() > deadline:
            pytest.fail(f"lock {name!r} still held {EXPIRY_DEADLINE} s after its ttl")
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        clock = FakeClock()
        chosen = Backend(
            "sqlite",
            factory=lambda: SqliteStore(tmp_path / "state.db", clock=clock),
            let_expire=lambda _store, _name: clock.advance(SHORT_TTL + 0.001),
        )
    else:
        server: EtcdProcess = request.getfixturevalue("etcd_server")
        prefix = f"/test-{uuid.uuid4().hex}/"
        chosen = Backend(
            "etcd",
            factory=lambda: EtcdStore(server.endpoint, prefix=prefix),
            let_expire=wait_for_release,
        )
    yield chosen
    for store in chosen.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def increment(store: Store, key: str) -> None:
    """Add one to the JSON counter at ``key`` with a compare-and-set retry loop."""
    for _ in range(10_000):
        entry = store.get(key)
        count = 0 if entry is None else int(json.loads(entry.value))
        try:
            store.put(key, json.dumps(count + 1), expect_revision=entry.revision if entry else 0)
            return
        except StoreConflict:
            continue
    raise AssertionError(f"no progress incrementing {key!r}")


# --- get, put, delete, list --------------------------------------------------------------------


def test_get_of_an_absent_key_is_none(store: Store) -> None:
    assert store.get("certs/proxy") is None


def test_put_then_get_returns_the_value_at_the_returned_revision(store: Store) -> None:
    revision = store.put("certs/proxy", '{"generation": 1}')
    assert revision > 0
    assert store.get("certs/proxy") == Entry("certs/proxy", '{"generation": 1}', revision)


def test_values_are_opaque_text(store: Store) -> None:
    for key, value in [("a", ""), ("b", '{"pem": "-----BEGIN\\n\\u00e9"}\n'), ("c", "not json ✓")]:
        store.put(key, value)
        entry = store.get(key)
        assert entry is not None
        assert entry.value == value


def test_put_overwrites_at_a_higher_revision(store: Store) -> None:
    first = store.put("nodes/1", "1")
    second = store.put("nodes/1", "2")
    assert second > first
    assert store.get("nodes/1") == Entry("nodes/1", "2", second)


def test_delete_reports_whether_the_key_existed(store: Store) -> None:
    store.put("nodes/1", "{}")
    assert store.delete("nodes/1") is True
    assert store.get("nodes/1") is None
    assert store.delete("nodes/1") is False


def test_list_returns_the_prefix_sorted_by_key(store: Store) -> None:
    keys = [
        "events/000000010",
        "certs/proxy",
        "certs/api",
        "certsX",
        "certs0",  # "0" follows "/": the first key past the prefix
        "nodes/2",
        "events/000000002",
        "nodes/10",
        "certs/é",
    ]
    revisions = {key: store.put(key, json.dumps(key)) for key in keys}
    listed = store.list("certs/")
    assert [e.key for e in listed] == ["certs/api", "certs/proxy", "certs/é"]
    assert all(e.value == json.dumps(e.key) and e.revision == revisions[e.key] for e in listed)
    assert [e.key for e in store.list("events/")] == ["events/000000002", "events/000000010"]
    assert [e.key for e in store.list("")] == sorted(keys)
    assert store.list("nothing/") == []


def test_revisions_name_every_key_under_the_prefixes_without_values(store: Store) -> None:
    revisions = {k: store.put(k, "{}") for k in ("certs/api", "certs/proxy", "meta/a", "nodes/1")}
    both = store.commit([Put("certs/api", "2"), Put("meta/applied", "3")])
    store.delete("certs/proxy")
    assert store.try_lock("meta/lock", "owner-a", LONG_TTL)  # locks are not keys
    assert store.revisions(["certs/", "meta/applied", "rollouts/"]) == {
        "certs/api": both,
        "meta/applied": both,
    }
    assert store.revisions(["meta/", "nodes/1"]) == {
        "meta/a": revisions["meta/a"],
        "meta/applied": both,
        "nodes/1": revisions["nodes/1"],
    }
    assert store.revisions([]) == {}
    assert store.revisions(["nothing/"]) == {}


def test_locks_are_not_keys(store: Store) -> None:
    store.put("x", "1")
    assert store.try_lock("x", "owner-a", LONG_TTL)
    assert [e.key for e in store.list("")] == ["x"]
    assert store.get("x") == Entry("x", "1", store.list("")[0].revision)


# --- compare-and-set -----------------------------------------------------------------------------


def test_put_expecting_absence_creates_once(store: Store) -> None:
    revision = store.put("certs/ldap_client", "v1", expect_revision=0)
    with pytest.raises(
        StoreConflict, match=r"'certs/ldap_client': expected it absent, found it at revision \d+"
    ):
        store.put("certs/ldap_client", "v2", expect_revision=0)
    assert store.get("certs/ldap_client") == Entry("certs/ldap_client", "v1", revision)


def test_put_expecting_a_revision(store: Store) -> None:
    first = store.put("certs/proxy", "v1")
    second = store.put("certs/proxy", "v2", expect_revision=first)
    assert second > first
    with pytest.raises(StoreConflict, match=rf"expected it at revision {first}, found it at"):
        store.put("certs/proxy", "v3", expect_revision=first)
    assert store.get("certs/proxy") == Entry("certs/proxy", "v2", second)


def test_put_expecting_a_revision_of_an_absent_key_conflicts(store: Store) -> None:
    with pytest.raises(
        StoreConflict, match=r"'nodes/9': expected it at revision 5, found it absent"
    ):
        store.put("nodes/9", "{}", expect_revision=5)
    assert store.get("nodes/9") is None


def test_delete_expecting_a_revision(store: Store) -> None:
    first = store.put("nodes/1", "a")
    second = store.put("nodes/1", "b")
    with pytest.raises(StoreConflict, match="'nodes/1'"):
        store.delete("nodes/1", expect_revision=first)
    assert store.get("nodes/1") == Entry("nodes/1", "b", second)
    assert store.delete("nodes/1", expect_revision=second) is True
    assert store.get("nodes/1") is None
    with pytest.raises(StoreConflict, match="found it absent"):
        store.delete("nodes/1", expect_revision=second)


def test_delete_expecting_absence(store: Store) -> None:
    assert store.delete("nodes/1", expect_revision=0) is False
    revision = store.put("nodes/1", "a")
    with pytest.raises(
        StoreConflict, match=rf"expected it absent, found it at revision {revision}"
    ):
        store.delete("nodes/1", expect_revision=0)
    assert store.get("nodes/1") == Entry("nodes/1", "a", revision)


def test_commit_applies_every_operation_at_one_new_revision(store: Store) -> None:
    old = store.put("certs/proxy", "old")
    store.put("tmp/x", "x")
    revision = store.commit(
        [
            Put("certs/proxy", "new", expect_revision=old),
            Put("events/000000001", "{}", expect_revision=0),
            Put("nodes/1", "{}"),
            Delete("tmp/x"),
            Delete("tmp/never-existed"),
        ]
    )
    assert revision > old
    assert store.list("") == [
        Entry("certs/proxy", "new", revision),
        Entry("events/000000001", "{}", revision),
        Entry("nodes/1", "{}", revision),
    ]


def test_commit_with_a_failing_expectation_changes_nothing(store: Store) -> None:
    proxy = store.put("certs/proxy", "v1")
    store.put("nodes/1", "n1")
    store.put("nodes/2", "n2")
    before = store.list("")
    with pytest.raises(StoreConflict, match=r"'nodes/1': expected it absent") as caught:
        store.commit(
            [
                Put("certs/proxy", "v2", expect_revision=proxy),  # holds
                Put("events/1", "{}", expect_revision=0),  # holds
                Delete("nodes/2"),  # unconditional
                Put("nodes/1", "x", expect_revision=0),  # fails first
                Put("nodes/3", "x", expect_revision=12345),  # fails too, later
            ]
        )
    assert "nodes/3" not in str(caught.value)
    assert store.list("") == before
    assert store.put("after", "1") > max(e.revision for e in before)


def test_commit_of_nothing_changes_nothing(store: Store) -> None:
    revision = store.put("a", "1")
    assert store.commit([]) >= revision
    assert store.commit([Delete("absent")]) >= revision
    assert store.list("") == [Entry("a", "1", revision)]


def test_revisions_only_increase(store: Store) -> None:
    seen = [
        store.put("a", "1"),
        store.put("b", "1"),
        store.put("a", "2", expect_revision=None),
        store.commit([Put("c", "1"), Delete("b")]),
        store.put("b", "again", expect_revision=0),
    ]
    store.delete("a")
    seen.append(store.put("a", "3"))
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)


def test_misuse_is_a_programming_error(store: Store) -> None:
    with pytest.raises(ValueError, match="more than once"):
        store.commit([Put("a", "1"), Delete("a")])
    with pytest.raises(ValueError, match="must not be empty"):
        store.put("", "1")
    with pytest.raises(ValueError, match=">= 0"):
        store.put("a", "1", expect_revision=-1)
    with pytest.raises(TypeError, match="Put and Delete"):
        store.commit(["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="ttl must be > 0"):
        store.try_lock("rollout", "owner-a", 0)
    assert store.list("") == []


def test_compare_and_set_holds_between_store_objects(backend: Backend) -> None:
    """Two Store objects on the same data (on SQLite: two connections to one file)."""
    one, two = backend.open(), backend.open()
    revision = one.put("certs/proxy", "from one", expect_revision=0)
    assert two.get("certs/proxy") == Entry("certs/proxy", "from one", revision)
    newer = two.put("certs/proxy", "from two", expect_revision=revision)
    with pytest.raises(StoreConflict, match="'certs/proxy'"):
        one.put("certs/proxy", "stale", expect_revision=revision)
    with pytest.raises(StoreConflict, match="'certs/proxy'"):
        one.commit([Put("certs/proxy", "stale", expect_revision=revision)])
    assert one.get("certs/proxy") == Entry("certs/proxy", "from two", newer)


def test_concurrent_compare_and_set_loses_no_update(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    threads, rounds = 4, 15

    def work(index: int) -> None:
        for _ in range(rounds):
            increment(stores[index % 2], "counter")

    with ThreadPoolExecutor(threads) as pool:
        for result in [pool.submit(work, i) for i in range(threads)]:
            result.result()
    entry = stores[0].get("counter")
    assert entry is not None
    assert json.loads(entry.value) == threads * rounds


# --- locks -------------------------------------------------------------------------------------


def test_a_lock_has_one_holder(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    assert one.lock_holder("rollout") is None
    assert one.try_lock("rollout", "owner-a", LONG_TTL) is True
    assert two.try_lock("rollout", "owner-b", LONG_TTL) is False
    assert one.lock_holder("rollout") == "owner-a"
    assert two.lock_holder("rollout") == "owner-a"
    assert two.refresh_lock("rollout", "owner-b", LONG_TTL) is False


def test_the_holder_may_retake_and_refresh(store: Store) -> None:
    assert store.try_lock("rollout", "owner-a", LONG_TTL) is True
    assert store.try_lock("rollout", "owner-a", LONG_TTL) is True
    assert store.refresh_lock("rollout", "owner-a", LONG_TTL) is True
    assert store.lock_holder("rollout") == "owner-a"


def test_locks_are_independent(store: Store) -> None:
    assert store.try_lock("rollout", "owner-a", LONG_TTL)
    assert store.try_lock("reconcile", "owner-b", LONG_TTL)
    assert store.lock_holder("rollout") == "owner-a"
    assert store.lock_holder("reconcile") == "owner-b"


def test_unlock_by_a_non_holder_does_nothing(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    two.unlock("rollout", "owner-b")  # nobody holds it
    assert one.try_lock("rollout", "owner-a", LONG_TTL)
    two.unlock("rollout", "owner-b")
    assert two.lock_holder("rollout") == "owner-a"
    assert two.try_lock("rollout", "owner-b", LONG_TTL) is False


def test_unlock_by_the_holder_frees_the_lock(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    assert one.try_lock("rollout", "owner-a", LONG_TTL)
    one.unlock("rollout", "owner-a")
    one.unlock("rollout", "owner-a")  # idempotent
    assert one.lock_holder("rollout") is None
    assert one.refresh_lock("rollout", "owner-a", LONG_TTL) is False
    assert two.try_lock("rollout", "owner-b", LONG_TTL) is True


def test_a_lock_not_refreshed_within_its_ttl_is_lost(backend: Backend) -> None:
    """A crashed holder: it took the lock and never refreshed it."""
    one, two = backend.open(), backend.open()
    assert one.try_lock("rollout", "owner-a", SHORT_TTL)
    backend.let_expire(one, "rollout")
    assert two.lock_holder("rollout") is None
    assert one.refresh_lock("rollout", "owner-a", SHORT_TTL) is False
    assert two.try_lock("rollout", "owner-b", LONG_TTL) is True
    one.unlock("rollout", "owner-a")  # the former holder's late unlock must not free it
    assert two.lock_holder("rollout") == "owner-b"


def test_racing_owners_get_one_lock(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    barrier = threading.Barrier(6)

    def take(index: int) -> bool:
        barrier.wait()
        return stores[index % 2].try_lock("rollout", f"owner-{index}", LONG_TTL)

    with ThreadPoolExecutor(6) as pool:
        won = [index for index, ok in enumerate(pool.map(take, range(6))) if ok]
    assert len(won) == 1
    assert stores[0].lock_holder("rollout") == f"owner-{won[0]}"


# --- lifecycle and failures ----------------------------------------------------------------------


def test_a_closed_store_raises_store_error(backend: Backend) -> None:
    store = backend.factory()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="reading 'certs/proxy': the store is closed"):
        store.get("certs/proxy")
    with pytest.raises(StoreError, match="writing 'certs/proxy': the store is closed"):
        store.put("certs/proxy", "1")


def test_store_is_a_context_manager(backend: Backend) -> None:
    with backend.factory() as store:
        store.put("a", "1")
    with pytest.raises(StoreError, match="closed"):
        store.get("a")


# --- SQLite specifics --------------------------------------------------------------------------


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        store.put("a", "1")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["state.db", "state.db-shm", "state.db-wal"]
        for path in tmp_path.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_sqlite_data_survives_reopening(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        revision = store.commit([Put("a", "1"), Put("b", "2")])
    with SqliteStore(tmp_path / "state.db") as store:
        assert store.list("") == [Entry("a", "1", revision), Entry("b", "2", revision)]
        assert store.put("c", "3") > revision


def test_sqlite_unwritable_location_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match=r"SQLite store '.*a-file/state.db': opening the database"):
        SqliteStore(tmp_path / "a-file" / "state.db")
    with pytest.raises(StoreError, match=r"opening the database: .*No such file or directory"):
        SqliteStore(tmp_path / "missing-dir" / "state.db")


def test_sqlite_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"certainly not SQLite " * 100)
    with pytest.raises(StoreError, match="initialising the database: file is not a database"):
        SqliteStore(tmp_path / "state.db")


def test_sqlite_write_blocked_by_another_writer_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path, busy_timeout=0.05) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match=r"writing 'certs/proxy': database is locked"):
                store.put("certs/proxy", "1")
            assert store.get("certs/proxy") is None  # readers are not blocked (WAL)
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert store.put("certs/proxy", "1") > 0


def test_sqlite_refresh_extends_the_ttl_from_now(tmp_path: Path) -> None:
    clock = FakeClock()
    with SqliteStore(tmp_path / "state.db", clock=clock) as store:
        assert store.try_lock("rollout", "owner-a", 10)
        clock.advance(8)
        assert store.refresh_lock("rollout", "owner-a", 10)
        clock.advance(8)  # 16 s after taking it, 8 s after the refresh
        assert store.lock_holder("rollout") == "owner-a"
        assert store.try_lock("rollout", "owner-b", 10) is False
        clock.advance(2.001)
        assert store.lock_holder("rollout") is None
        assert store.try_lock("rollout", "owner-b", 10) is True


_CROSS_PROCESS_WORKER = """
import json, sys
from clustercert.errors import StoreConflict
from clustercert.store import SqliteStore

store = SqliteStore(sys.argv[1])
for _ in range(int(sys.argv[2])):
    while True:
        entry = store.get("counter")
        count = 0 if entry is None else json.loads(entry.value)
        try:
            store.put("counter", json.dumps(count + 1),
                      expect_revision=entry.revision if entry else 0)
            break
        except StoreConflict:
            pass
store.close()
"""


def test_sqlite_compare_and_set_holds_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    rounds = 40
    with SqliteStore(path) as store:
        workers = [
            subprocess.Popen([sys.executable, "-c", _CROSS_PROCESS_WORKER, str(path), str(rounds)])
            for _ in range(3)
        ]
        for _ in range(rounds):
            increment(store, "counter")
        for worker in workers:
            assert worker.wait(timeout=120) == 0
        entry = store.get("counter")
        assert entry is not None
        assert json.loads(entry.value) == 4 * rounds


def test_sqlite_lock_is_visible_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        taker = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from clustercert.store import SqliteStore\n"
                "s = SqliteStore(sys.argv[1])\n"
                "print(s.try_lock('rollout', 'other', 600))\n"
                "s.close()",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert taker.stdout.strip() == "True"
        assert store.lock_holder("rollout") == "other"
        assert store.try_lock("rollout", "owner-a", LONG_TTL) is False


# --- etcd specifics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "doing"),
    [
        (lambda s: s.get("certs/proxy"), "reading 'certs/proxy'"),
        (lambda s: s.put("certs/proxy", "1"), "writing 'certs/proxy'"),
        (lambda s: s.delete("nodes/1", expect_revision=3), "deleting 'nodes/1'"),
        (lambda s: s.list("events/"), "listing keys under 'events/'"),
        (lambda s: s.commit([Put("a", "1")]), r"committing 1 operation\(s\)"),
        (lambda s: s.try_lock("rollout", "owner-a", 5), "taking lock 'rollout' for 'owner-a'"),
        (lambda s: s.lock_holder("rollout"), "reading lock 'rollout'"),
    ],
)
def test_etcd_closed_port_is_a_store_error(
    operation: Callable[[Store], object], doing: str
) -> None:
    (port,) = free_ports(1)
    expected = (
        rf"etcd store at http://127.0.0.1:{port} \(prefix '/clustercert/'\): {doing}: "
        rf"cannot reach etcd \(ConnectError"
    )
    with (
        EtcdStore(f"http://127.0.0.1:{port}", timeout=2.0) as store,
        pytest.raises(StoreError, match=expected),
    ):
        operation(store)


def test_etcd_stopped_server_is_a_store_error(tmp_path: Path) -> None:
    server = EtcdProcess(tmp_path / "etcd")
    try:
        with EtcdStore(server.endpoint, timeout=2.0) as store:
            store.put("certs/proxy", "1")
            server.stop()
            with pytest.raises(StoreError, match="reading 'certs/proxy': cannot reach etcd"):
                store.get("certs/proxy")
    finally:
        server.stop()


def test_etcd_answer_from_something_else_is_a_store_error() -> None:
    with (
        not_etcd(404, b"<html>not here</html>", "text/html") as url,
        EtcdStore(url) as store,
        pytest.raises(
            StoreError,
            match=r"reading 'a': kv/range answered HTTP 404 Not Found, not etcd's JSON gateway",
        ),
    ):
        store.get("a")
    with (
        not_etcd(200, b'{"kvs": "surprise"}', "application/json") as url,
        EtcdStore(url) as store,
        pytest.raises(StoreError, match=r"reading 'a': unexpected answer from etcd"),
    ):
        store.get("a")
    with (
        not_etcd(200, b"[1, 2]", "application/json") as url,
        EtcdStore(url) as store,
        pytest.raises(StoreError, match=r"listing keys under '': unexpected answer from etcd"),
    ):
        store.list("")


def test_etcd_refusal_is_a_store_error_with_etcds_reason(etcd_server: EtcdProcess) -> None:
    with EtcdStore(etcd_server.endpoint, prefix=f"/test-{uuid.uuid4().hex}/") as store:
        too_many = [Put(f"k{i}", "v") for i in range(129)]  # etcd's default --max-txn-ops: 128
        with pytest.raises(
            StoreError,
            match=r"committing 129 operation\(s\): etcd refused kv/txn \(HTTP 400\): "
            r"etcdserver: too many operations in txn request",
        ):
            store.commit(too_many)
        assert store.list("") == []


def test_etcd_list_pages_through_many_keys(etcd_server: EtcdProcess) -> None:
    with EtcdStore(etcd_server.endpoint, prefix=f"/test-{uuid.uuid4().hex}/") as store:
        keys = [f"events/{i:09d}" for i in range(1100)]
        for start in range(0, len(keys), 100):
            store.commit([Put(key, json.dumps(key)) for key in keys[start : start + 100]])
        store.put("other", "1")
        listed = store.list("events/")
        assert [e.key for e in listed] == keys
        assert all(e.value == json.dumps(e.key) for e in listed)


def test_etcd_prefixes_keep_clusters_apart(etcd_server: EtcdProcess) -> None:
    base = f"/test-{uuid.uuid4().hex}"
    with (
        EtcdStore(etcd_server.endpoint, prefix=f"{base}/one") as one,
        EtcdStore(etcd_server.endpoint, prefix=f"{base}/one-more/") as two,
    ):
        one.put("certs/proxy", "1")
        assert one.try_lock("rollout", "owner-a", LONG_TTL)
        assert two.get("certs/proxy") is None
        assert two.list("") == []
        assert two.try_lock("rollout", "owner-b", LONG_TTL)


# --- open_store ----------------------------------------------------------------------------------


def test_open_store_opens_sqlite_from_a_path_or_url(tmp_path: Path) -> None:
    locations: list[str | Path] = [
        str(tmp_path / "a.db"),
        tmp_path / "b.db",
        f"sqlite://{tmp_path}/c.db",
    ]
    for location in locations:
        with open_store(location) as store:
            assert isinstance(store, SqliteStore)
            store.put("k", "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "b.db", "c.db"]


def test_open_store_opens_etcd(etcd_server: EtcdProcess) -> None:
    host_port = etcd_server.endpoint.removeprefix("http://")
    prefix = f"test-{uuid.uuid4().hex}"
    with open_store(f"etcd://{host_port}/{prefix}") as store:
        assert isinstance(store, EtcdStore)
        store.put("certs/proxy", "1")
    with EtcdStore(etcd_server.endpoint, prefix=f"/{prefix}/") as same:
        assert same.get("certs/proxy") is not None
    with open_store("etcd://127.0.0.1") as default:
        assert repr(default) == "EtcdStore('http://127.0.0.1:2379', prefix='/clustercert/')"


def test_open_store_names_several_etcd_members() -> None:
    with open_store("etcd://10.0.0.1:2379,10.0.0.2,[::1]:2381/pfx") as store:
        assert repr(store) == (
            "EtcdStore('http://10.0.0.1:2379,http://10.0.0.2:2379,http://[::1]:2381', "
            "prefix='/pfx/')"
        )


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("", "empty store location"),
        ("etcd://127.0.0.1:2379,,127.0.0.1:2380", "expected a file path"),
        ("etcd://127.0.0.1:2379,127.0.0.1:x", "expected a file path"),
        ("sqlite://relative.db", "absolute path after three slashes"),
        ("sqlite:relative.db", "absolute path after three slashes"),
        ("etcd://", "expected a file path"),
        ("etcd://127.0.0.1:notaport", "expected a file path"),
        ("redis://127.0.0.1:6379", "unknown scheme 'redis'"),
    ],
)
def test_open_store_rejects_other_locations(location: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(location)


@contextlib.contextmanager
def _behind_a_dying_member(
    etcd_server: EtcdProcess, forward: bool
) -> Iterator[tuple[EtcdStore, int]]:
    """A store naming a member that dies mid-request (forwarding its transactions first when
    ``forward``), then the real one; and the revision of ``certs/proxy``, put beforehand."""
    prefix = f"/test-{uuid.uuid4().hex}/"
    with EtcdStore(etcd_server.endpoint, prefix=prefix) as direct:
        revision = direct.put("certs/proxy", '"v1"')
    with (
        dying_member(etcd_server.endpoint, forward=forward) as dying,
        EtcdStore([dying, etcd_server.endpoint], prefix=prefix) as store,
    ):
        yield store, revision


def test_a_revisions_read_cut_off_by_a_dying_member_goes_to_the_next(
    etcd_server: EtcdProcess,
) -> None:
    """revisions() is a read-only transaction: cut off, it is repeated on the next member
    like any read (a write transaction is read back first: the test below)."""
    with _behind_a_dying_member(etcd_server, forward=True) as (store, revision):
        assert store.revisions(["certs/"]) == {"certs/proxy": revision}


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_a_transaction_cut_off_by_a_dying_member_is_applied_exactly_once(
    etcd_server: EtcdProcess, landed: bool
) -> None:
    with _behind_a_dying_member(etcd_server, forward=landed) as (store, revision):
        store.commit([Put("certs/proxy", '"v2"', expect_revision=revision)])
        entry = store.get("certs/proxy")
        assert entry is not None and entry.value == '"v2"'
        # exactly one write: one revision past the first put (a second write would be two)
        assert entry.revision == revision + 1
