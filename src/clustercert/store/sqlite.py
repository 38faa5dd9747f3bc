"""The default store backend: one SQLite file in the cluster directory (DESIGN §9).

Layout of the file (``PRAGMA user_version = 1``):

- ``revision``: one row, the store-wide revision counter. A write transaction reads it, adds one
  and stamps every row it writes with the result, so one commit is one revision.
- ``kv(key, value, revision)``: the keys.
- ``locks(name, owner, expires_at)``: the locks; ``expires_at`` is wall-clock seconds
  (``time.time`` by default) because several processes may share the file and
  ``time.monotonic`` is not comparable between processes.

Writes run inside ``BEGIN IMMEDIATE``, which takes SQLite's write lock before the first read,
so a compare-and-set is atomic across threads *and* processes sharing the file. WAL mode lets
readers proceed while a writer works; ``busy_timeout`` makes a writer wait for another one
instead of failing at once. ``synchronous = FULL`` because a recorded rollout decision must
survive a power cut (DESIGN §6 step 4); the locks' commits alone skip the fsync (a lock that
only lived on this host dies with its holder: see ``_transaction``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from clustercert.errors import StoreError
from clustercert.store.base import (
    Delete,
    Entry,
    Put,
    Store,
    check_key,
    check_lock,
    check_ops,
    check_prefixes,
    conflict,
    expectation_holds,
)

__all__ = ["SqliteStore"]

_T = TypeVar("_T")


def _under(prefix: str) -> tuple[str, tuple[str | int, ...]]:
    """The WHERE clause (and its parameters) for the keys that start with ``prefix``: an
    index range from ``prefix`` up to the first string after every key starting with it, so
    SQLite reads only those rows (``key >= prefix`` alone read on to the end of the table);
    substr() is the exact test."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return "key >= ? AND substr(key, 1, ?) = ?", (prefix, len(prefix), prefix)
    following = ord(stripped[-1]) + 1
    end = stripped[:-1] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)
    return "key >= ? AND key < ? AND substr(key, 1, ?) = ?", (prefix, end, len(prefix), prefix)


_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    current INTEGER NOT NULL
);
INSERT OR IGNORE INTO revision (id, current) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision > 0)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


class SqliteStore(Store):
    """A :class:`~clustercert.store.base.Store` in one SQLite file.

    ``path``: the database file. It is created with mode 0600 if missing (its directory must
    exist); SQLite gives its ``-wal`` and ``-shm`` companions the same mode. An existing file
    keeps its mode. ``clock``: wall-clock seconds for lock expiry, injectable for tests; every
    process sharing the file must use a comparable clock. ``busy_timeout``: seconds a write waits
    for another connection's write lock before failing with :class:`StoreError`.

    Thread-safe: one connection, used under a lock. Raises :class:`StoreError` if the file
    cannot be created, opened or initialised.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._mutex = threading.Lock()
        self._closed = False
        doing = "opening the database"
        try:
            # Create the file ourselves so that it never exists with a wider mode.
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise self._error(doing, exc) from exc
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # shared between threads under self._mutex
            )
        except sqlite3.Error as exc:
            raise self._error(doing, exc) from exc
        self._conn = conn
        try:
            self._initialise(busy_timeout)
        except BaseException:
            conn.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    # --- keys ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        check_key(key)

        def read(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute("SELECT value, revision FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else Entry(key, row[0], row[1])

        return self._read(f"reading {key!r}", read)

    def put(self, key: str, value: str, *, expect_revision: int | None = None) -> int:
        check_ops([Put(key, value, expect_revision)])
        revision, _ = self._write(f"writing {key!r}", [Put(key, value, expect_revision)])
        return revision

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        check_ops([Delete(key, expect_revision)])
        _, changed = self._write(f"deleting {key!r}", [Delete(key, expect_revision)])
        return changed

    def list(self, prefix: str) -> list[Entry]:
        check_prefixes(prefix)

        where, arguments = _under(prefix)

        def read(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"SELECT key, value, revision FROM kv WHERE {where} ORDER BY key",  # noqa: S608
                arguments,
            ).fetchall()
            return [Entry(k, v, r) for k, v, r in rows]

        return self._read(f"listing keys under {prefix!r}", read)

    def revisions(self, prefixes: Sequence[str]) -> dict[str, int]:
        check_prefixes(*prefixes)
        if not prefixes:
            return {}
        # One statement (one snapshot), one index range per prefix; the text is a constant
        # clause per prefix, the prefixes are bound parameters.
        ranges = [_under(p) for p in prefixes]
        select = "SELECT key, revision FROM kv WHERE "
        query = " UNION ALL ".join(select + where for where, _ in ranges)
        arguments = [a for _, values in ranges for a in values]

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(query, arguments).fetchall())

        return self._read(f"reading the revisions under {list(prefixes)!r}", read)

    def commit(self, ops: Sequence[Put | Delete]) -> int:
        check_ops(ops)
        revision, _ = self._write(f"committing {len(ops)} operation(s)", ops)
        return revision

    # --- locks --------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_lock(name, owner, ttl)

        def take(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            row = conn.execute("SELECT owner, expires_at FROM locks WHERE name = ?", (name,))
            held = row.fetchone()
            if held is not None and held[0] != owner and held[1] > now:
                return False
            conn.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at",
                (name, owner, now + ttl),
            )
            return True

        return self._transaction(f"taking lock {name!r} for {owner!r}", take, durable=False)

    def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_lock(name, owner, ttl)

        def refresh(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            cursor = conn.execute(
                "UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ? AND expires_at > ?",
                (now + ttl, name, owner, now),
            )
            return cursor.rowcount == 1

        return self._transaction(f"refreshing lock {name!r} for {owner!r}", refresh, durable=False)

    def unlock(self, name: str, owner: str) -> None:
        check_lock(name, owner)

        def release(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

        self._transaction(f"releasing lock {name!r} for {owner!r}", release, durable=False)

    def lock_holder(self, name: str) -> str | None:
        check_lock(name)

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT owner FROM locks WHERE name = ? AND expires_at > ?",
                (name, self._clock()),
            ).fetchone()
            return None if row is None else str(row[0])

        return self._read(f"reading lock {name!r}", read)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise self._error("closing the database", exc) from exc

    # --- internals ----------------------------------------------------------------------

    def _error(self, doing: str, what: BaseException | str) -> StoreError:
        """The one format of this backend's errors: where, what it was doing, what failed."""
        return StoreError(f"SQLite store {str(self._path)!r}: {doing}: {what}")

    def _initialise(self, busy_timeout: float) -> None:
        doing = "initialising the database"
        with self._mutex:
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise self._error(
                        doing,
                        f"cannot switch to WAL journal mode (got {mode!r}); is the file on a "
                        "network filesystem?",
                    )
                self._conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise self._error(doing, exc) from exc

        def migrate(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise self._error(
                    doing,
                    f"schema version {version} is newer than this clustercert understands "
                    f"({_SCHEMA_VERSION}); upgrade it",
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

        self._transaction(doing, migrate)

    def _usable(self, doing: str) -> sqlite3.Connection:
        if self._closed:
            raise self._error(doing, "the store is closed")
        return self._conn

    def _read(self, doing: str, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``read`` (one SELECT: a consistent snapshot in autocommit mode)."""
        with self._mutex:
            conn = self._usable(doing)
            try:
                return read(conn)
            except sqlite3.Error as exc:
                raise self._error(doing, exc) from exc

    def _transaction(
        self, doing: str, work: Callable[[sqlite3.Connection], _T], *, durable: bool = True
    ) -> _T:
        """Run ``work`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back on any exception.

        Not ``durable``: the commit does not wait for an fsync (``synchronous = NORMAL``). In
        WAL mode it is still atomic and ordered: a power cut may lose it, and only with every
        commit after it up to the next durable one, whose fsync covers it. The locks use it:
        every process that shares the file runs on this host, so a power cut that loses a
        lock also stopped its holder (a rollout's durable record says what it had done)."""
        with self._mutex:
            conn = self._usable(doing)
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._restore_synchronous(conn, durable)
                raise self._error(doing, exc) from exc
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                # SQLite may already have ended the transaction on the error: nothing to undo.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(doing, exc) from exc
                raise
            finally:
                self._restore_synchronous(conn, durable)
            return result

    def _restore_synchronous(self, conn: sqlite3.Connection, durable: bool) -> None:
        """Back to durable commits; failing that, fail (never go on without the fsyncs)."""
        if not durable:
            try:
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise self._error("restoring synchronous = FULL", exc) from exc

    def _write(self, doing: str, ops: Sequence[Put | Delete]) -> tuple[int, bool]:
        """Check every expectation, then apply ``ops`` at one new revision.

        Returns the revision (the current one if nothing changed) and whether anything changed.
        """

        def apply(conn: sqlite3.Connection) -> tuple[int, bool]:
            current: int = conn.execute("SELECT current FROM revision WHERE id = 1").fetchone()[0]
            for op in ops:
                if op.expect_revision is None:
                    continue
                row = conn.execute("SELECT revision FROM kv WHERE key = ?", (op.key,)).fetchone()
                found = 0 if row is None else int(row[0])
                if not expectation_holds(op.expect_revision, found):
                    raise conflict(op.key, op.expect_revision, found)
            new = current + 1
            changed = False
            for op in ops:
                if isinstance(op, Put):
                    conn.execute(
                        "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                        " revision = excluded.revision",
                        (op.key, op.value, new),
                    )
                    changed = True
                else:
                    cursor = conn.execute("DELETE FROM kv WHERE key = ?", (op.key,))
                    changed = changed or cursor.rowcount > 0
            if not changed:
                return current, False
            conn.execute("UPDATE revision SET current = ? WHERE id = 1", (new,))
            return new, True

        return self._transaction(doing, apply)
