"""The state-store interface (DESIGN §9): a small key-value contract with compare-and-set.

Every backend (:mod:`clustercert.store.sqlite`, :mod:`clustercert.store.etcd`) implements
:class:`Store` and passes the same contract suite (``tests/store/test_contract.py``).

Contract shared by every method:

- Keys and values are plain ``str``. Values are JSON text that the store never parses. The key
  layout (``certs/proxy``, ``nodes/1``, ``events/000000123``...) belongs to the caller.
- A *revision* is a store-wide, strictly increasing integer (etcd's ``mod_revision``). Every
  change gets a revision greater than every revision handed out before it; revisions are not
  contiguous (an etcd lock acquisition consumes one, for example). ``Entry.revision`` is the
  revision at which that key was last written, always ``> 0``.
- An *expectation* (``expect_revision``) guards a write: ``None`` writes unconditionally, ``0``
  requires that the key does not exist, ``n > 0`` requires that the key exists and was last
  written at revision ``n``. A failed expectation raises :class:`StoreConflict` and changes
  nothing.
- Backend failures (I/O, network, a malformed answer) raise :class:`StoreError` whose message
  names the backend and what it was doing. No backend-specific exception escapes.
- Misuse (an empty key, a negative revision, a non-positive ttl, two operations on one key in
  one commit) raises ``ValueError``/``TypeError``: those are programming mistakes.
- Every method is safe to call from several threads at once, and several processes (or control
  planes) may share one store: atomicity holds between all of them.

:class:`StoreError` and :class:`StoreConflict` are in :mod:`clustercert.errors`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from clustercert.errors import StoreConflict

__all__ = ["Delete", "Entry", "Put", "Store"]


@dataclass(frozen=True)
class Entry:
    """One key as read from the store."""

    key: str
    value: str
    """JSON text, opaque to the store."""
    revision: int
    """The revision at which this key was last modified (``> 0``)."""


@dataclass(frozen=True)
class Put:
    """Set ``key`` to ``value`` in :meth:`Store.commit`, if ``expect_revision`` holds."""

    key: str
    value: str
    expect_revision: int | None = None


@dataclass(frozen=True)
class Delete:
    """Remove ``key`` in :meth:`Store.commit`, if ``expect_revision`` holds.

    Deleting an absent key without an expectation is allowed and changes nothing.
    """

    key: str
    expect_revision: int | None = None


class Store(abc.ABC):
    """A key-value store with compare-and-set writes, atomic multi-key commits and leased locks.

    Usable as a context manager (``with open_store(...) as store:``), which closes it on exit.
    """

    # --- keys ---------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None:
        """Return the entry for ``key``, or ``None`` if it does not exist.

        Atomicity: one consistent read of one key. Raises :class:`StoreError`.
        """

    @abc.abstractmethod
    def put(self, key: str, value: str, *, expect_revision: int | None = None) -> int:
        """Set ``key`` to ``value`` and return the new revision (the entry's new ``revision``).

        Atomicity: compare-and-set. The expectation is checked and the value written as one
        step; no other writer can slip between them. Raises :class:`StoreConflict` (nothing
        written) if the expectation fails, :class:`StoreError` if the backend fails (then the
        write may or may not have happened: read the key back before retrying blindly).
        """

    @abc.abstractmethod
    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        """Remove ``key``; return ``True`` if it existed, ``False`` if it was absent.

        Atomicity: compare-and-delete, as :meth:`put`. With ``expect_revision=0`` the key must
        be absent (nothing is deleted, ``False``); with ``n > 0`` it must exist at revision
        ``n``. Raises :class:`StoreConflict` (nothing deleted) if the expectation fails,
        :class:`StoreError` if the backend fails.
        """

    @abc.abstractmethod
    def list(self, prefix: str) -> list[Entry]:
        """Return every entry whose key starts with ``prefix`` (``""``: all keys), sorted by key.

        Atomicity: one consistent snapshot; concurrent writes are either all visible or not at
        all. Sort order is by code point (the same as UTF-8 byte order). Lock records are not
        keys and never appear. Raises :class:`StoreError`.
        """

    def revisions(self, prefixes: Sequence[str]) -> dict[str, int]:
        """Every key that starts with any of ``prefixes``, with its revision; no value is read.

        A cheap change check: what a poll compares before it reads the values. Atomicity: the
        backends override this with one consistent snapshot of every prefix (this default,
        one :meth:`list` per prefix, is not). Raises :class:`StoreError`.
        """
        return {e.key: e.revision for prefix in prefixes for e in self.list(prefix)}

    @abc.abstractmethod
    def commit(self, ops: Sequence[Put | Delete]) -> int:
        """Apply every operation of ``ops`` as one transaction; return its revision.

        Atomicity: all-or-nothing. Every expectation is checked first; only if all hold are
        all operations applied, together, at ONE new revision that every written entry then
        carries. Otherwise :class:`StoreConflict` names the first failing key (in ``ops``
        order) and nothing changes. An empty ``ops`` (or one that changes nothing, such as
        deleting absent keys) changes nothing and returns the store's current revision. Each key
        may appear at most once (``ValueError``). etcd caps a transaction at its
        ``--max-txn-ops`` (128 by default); beyond that the backend raises :class:`StoreError`.
        Raises :class:`StoreError` if the backend fails.
        """

    # --- locks --------------------------------------------------------------------------
    # A lock is a name held by one owner string for ``ttl`` seconds. Owners must be unique per
    # holder (e.g. include the host name, process id and a random part): two holders using one
    # owner string are the same holder to the store. Locks live apart from keys.

    @abc.abstractmethod
    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take lock ``name`` for ``owner`` without waiting; return whether ``owner`` holds it.

        ``True`` if the lock was free (or its holder's ttl ran out) and is now ``owner``'s, or
        if ``owner`` already held it (then the ttl is refreshed, as :meth:`refresh_lock`).
        ``False`` if another owner holds it. A holder that does not refresh within ``ttl``
        seconds loses the lock, so a crashed holder releases it by itself (etcd: a lease).
        Backends may round ``ttl`` up (etcd: whole seconds, at least the server's minimum
        lease ttl, fixed when the lock is taken).

        Atomicity: test-and-set; of concurrent callers at most one gets ``True``. Raises
        :class:`StoreError`; ``ValueError`` if ``ttl <= 0``.
        """

    @abc.abstractmethod
    def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s hold on lock ``name`` by ``ttl`` seconds from now.

        Returns ``False`` (and changes nothing) if ``owner`` no longer holds it, including when
        its ttl already ran out. Atomic. Raises :class:`StoreError`.
        """

    @abc.abstractmethod
    def unlock(self, name: str, owner: str) -> None:
        """Release lock ``name`` if ``owner`` holds it; otherwise do nothing.

        Atomic and idempotent. Raises :class:`StoreError`.
        """

    @abc.abstractmethod
    def lock_holder(self, name: str) -> str | None:
        """Return the owner currently holding lock ``name``, or ``None`` if it is free.

        A snapshot: the answer may be stale by the time it is used. Raises :class:`StoreError`.
        """

    # --- lifecycle ----------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's resources. Idempotent. Locks held are not released (they
        expire); any later call raises :class:`StoreError`."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- helpers shared by the backends (not part of the public surface) ----------------------


def check_key(key: str, what: str = "key") -> None:
    """Reject a key, lock name or owner that is not a non-empty ``str`` (a programming error)."""
    if not isinstance(key, str):
        raise TypeError(f"store {what} must be str, not {type(key).__name__}")
    if not key:
        raise ValueError(f"store {what} must not be empty")


def check_prefixes(*prefixes: str) -> None:
    """Reject a list or revisions prefix that is not a ``str`` (``""``, every key, is one)."""
    for prefix in prefixes:
        if not isinstance(prefix, str):
            raise TypeError(f"store prefix must be str, not {type(prefix).__name__}")


def check_expectation(expect_revision: int | None) -> None:
    """Reject an ``expect_revision`` that is neither ``None`` nor an ``int >= 0``."""
    if expect_revision is None:
        return
    if isinstance(expect_revision, bool) or not isinstance(expect_revision, int):
        raise TypeError(
            f"expect_revision must be int or None, not {type(expect_revision).__name__}"
        )
    if expect_revision < 0:
        raise ValueError(f"expect_revision must be >= 0, not {expect_revision}")


def check_ops(ops: Sequence[Put | Delete]) -> None:
    """Validate a :meth:`Store.commit` batch: known operations, valid keys, no key twice."""
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete):
            raise TypeError(f"commit takes Put and Delete operations, not {type(op).__name__}")
        check_key(op.key)
        check_expectation(op.expect_revision)
        if isinstance(op, Put) and not isinstance(op.value, str):
            raise TypeError(f"store value must be str, not {type(op.value).__name__}")
        if op.key in seen:
            raise ValueError(f"commit names key {op.key!r} more than once")
        seen.add(op.key)


def check_ttl(ttl: float) -> None:
    """Reject a lock ttl that is not a positive number of seconds."""
    if not ttl > 0:
        raise ValueError(f"lock ttl must be > 0 seconds, not {ttl!r}")


def check_lock(name: str, owner: str | None = None, ttl: float | None = None) -> None:
    """Reject a lock call's name, owner (when given) or ttl (when given)."""
    check_key(name, "lock name")
    if owner is not None:
        check_key(owner, "lock owner")
    if ttl is not None:
        check_ttl(ttl)


def conflict(key: str, expected: int, found: int) -> StoreConflict:
    """The :class:`StoreConflict` for ``key`` expected at ``expected``, found at ``found``.

    Revision ``0`` means "absent" on both sides.
    """

    def state(revision: int) -> str:
        return "absent" if revision == 0 else f"at revision {revision}"

    return StoreConflict(
        f"compare-and-set lost on {key!r}: expected it {state(expected)}, found it "
        f"{state(found)} (another writer changed it; re-read and retry)"
    )


def expectation_holds(expected: int | None, found: int) -> bool:
    """Whether an expectation holds against a key's current revision (``0``: absent)."""
    return expected is None or expected == found
