"""The shared store backend: etcd v3 through its JSON gateway, over httpx (DESIGN §9).

Several control planes may share one etcd. Layout under ``prefix`` (default ``/clustercert/``):

- ``<prefix>kv/<key>``: the keys of :class:`~clustercert.store.base.Store`; the value is the
  caller's JSON text, the revision etcd's ``mod_revision``.
- ``<prefix>lock/<name>``: a lock; the value is the owner, attached to a lease whose TTL is the
  lock's ttl. The lease is the expiry: a crashed holder stops keeping it alive and etcd deletes
  the key. Keeping locks outside ``kv/`` means no caller key can collide with one.

Mapping of the contract onto etcd (gateway paths under ``/v3/``, keys and values base64):

- get, list: ``kv/range`` (list pages through the prefix at one pinned revision, so it is one
  snapshot however many pages it takes);
- revisions: one read-only ``kv/txn`` of ``keys_only`` ranges (one snapshot of several
  prefixes; repeated on another member like a read);
- put, delete, commit: one ``kv/txn``. Its compares are the expectations (``mod_revision == n``,
  or ``create_revision == 0`` for "absent"); its success branch holds the writes, so they land
  at one revision; its failure branch reads back every guarded key so that a
  :class:`~clustercert.errors.StoreConflict` can name the first key that failed;
- try_lock: ``lease/grant`` then a txn that puts the lock key with that lease only if the key
  does not exist; refresh_lock: ``lease/keepalive``; unlock: ``lease/revoke``.

This client speaks HTTP to the gateway, which etcd serves on its client URL (3.4 serves
both ``/v3beta`` and ``/v3``; 3.5 only ``/v3``): plain, or HTTPS with a client certificate
(:class:`EtcdTLS`). Every httpx error, non-200 answer or answer of an unexpected shape becomes
a :class:`~clustercert.errors.StoreError` here.

Several members: given more than one client URL, a request that cannot reach a member (the
connection is refused or cannot be made, so nothing was sent) or that a member refuses because
it has no leader or no quorum (so nothing was applied) goes to the next member; the member that
answered is used first from then on. A read, lease revoke or keepalive cut off after it was
sent, or refused with a server error, goes to the next member too (repeating it changes
nothing). While members answer that they have no leader, the members are tried again in rounds
half a second apart, five rounds at most (an election after a member restarts can take more
than a second on a busy host). A transaction cut off that way
may have landed: the client reads its keys back through the next member and sends it once more
only if it did not (its compares turn a late landing into a conflict, never a double write).
With every member failing, the StoreError says so in one line.

TLS files follow rotations without a restart: before each operation the client looks at the
files' modification times; a CA file that changed is loaded again (its certificates are added
to those trusted: new connections verify against both, so a root is trusted before any member
presents a certificate from it), a client certificate that changed is presented on new
connections. Connections already open keep what they negotiated.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from clustercert.errors import StoreConflict, StoreError
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

__all__ = ["EtcdStore", "EtcdTLS"]

_T = TypeVar("_T")
_LIST_PAGE = 500

_Json = dict[str, Any]
_Jsons = list[_Json]  # `list` is a method name inside EtcdStore


class _MaybeApplied(Exception):
    """A transaction was sent to a member that died before answering: it may have landed."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


class _BadAnswer(Exception):
    """etcd answered, but not with what the gateway documents; becomes a StoreError."""


@dataclass(frozen=True)
class EtcdTLS:
    """HTTPS to etcd: ``ca_file`` holds the roots its members' certificates chain to;
    ``cert_file``/``key_file`` the client certificate etcd requires (``--client-cert-auth``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class _FollowedContext:
    """One client SSL context that follows its files (see the module docstring)."""

    def __init__(self, tls: EtcdTLS) -> None:
        self.tls = tls
        self.context = ssl.create_default_context()
        self._seen: dict[Path, tuple[int, int] | None] = {}
        self._lock = threading.Lock()
        self.follow()

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def follow(self) -> None:
        """Load what changed since the last call; raise OSError/ssl.SSLError if it does not
        load."""
        with self._lock:
            stamps = {p: self._stamp(p) for p in (self.tls.ca_file, self.tls.cert_file)}
            if stamps[self.tls.ca_file] != self._seen.get(self.tls.ca_file):
                self.context.load_verify_locations(cafile=self.tls.ca_file)
            if stamps[self.tls.cert_file] != self._seen.get(self.tls.cert_file):
                self.context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            self._seen = stamps


class EtcdStore(Store):
    """A :class:`~clustercert.store.base.Store` in etcd v3.

    ``endpoint``: etcd's client URL, or several members' (a sequence; see the module docstring
    for the failover). ``prefix``: where this cluster's data lives (normalised to
    start and end with ``/``); control planes of one cluster share it, different clusters must
    not. ``timeout``: seconds for each HTTP request. ``tls``: for an ``https://`` endpoint, the
    CA file and client certificate (files followed across rotations, see the module docstring).

    The constructor does not contact etcd; it raises StoreError if the TLS files do not load.
    Thread-safe (one pooled ``httpx.Client``; the TLS files are followed under a lock).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] = "http://127.0.0.1:2379",
        prefix: str = "/clustercert/",
        timeout: float = 5.0,
        tls: EtcdTLS | None = None,
    ) -> None:
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints:
            raise ValueError("an etcd store needs at least one endpoint")
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._endpoint = ",".join(self._endpoints)  # for messages
        self._current = 0  # the member that answered last: asked first
        self._prefix = f"/{prefix.strip('/')}/" if prefix.strip("/") else "/"
        self._kv = (self._prefix + "kv/").encode()
        self._locks = (self._prefix + "lock/").encode()
        self._tls: _FollowedContext | None = None
        if tls is not None:
            try:
                self._tls = _FollowedContext(tls)
            except (OSError, ssl.SSLError) as exc:
                raise self._error("loading the TLS files", _tls_problem(tls, exc)) from exc
        verify: ssl.SSLContext | bool = self._tls.context if self._tls is not None else True
        self._client = httpx.Client(timeout=timeout, verify=verify)
        self._closed = False
        self._closing = threading.Lock()

    @property
    def uses_tls(self) -> bool:
        """Whether this client speaks HTTPS with a client certificate."""
        return self._tls is not None

    def __repr__(self) -> str:
        return f"EtcdStore({self._endpoint!r}, prefix={self._prefix!r})"

    # --- keys ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        check_key(key)
        doing = f"reading {key!r}"

        def read() -> Entry | None:
            kvs = self._kvs(self._call("kv/range", {"key": _b64(self._kv + key.encode())}, doing))
            return self._entry(kvs[0]) if kvs else None

        return self._run(doing, read)

    def put(self, key: str, value: str, *, expect_revision: int | None = None) -> int:
        check_ops([Put(key, value, expect_revision)])
        doing = f"writing {key!r}"
        revision, _ = self._run(doing, lambda: self._txn([Put(key, value, expect_revision)], doing))
        return revision

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        check_ops([Delete(key, expect_revision)])
        doing = f"deleting {key!r}"
        _, deleted = self._run(doing, lambda: self._txn([Delete(key, expect_revision)], doing))
        return deleted

    def list(self, prefix: str) -> list[Entry]:
        check_prefixes(prefix)
        doing = f"listing keys under {prefix!r}"
        start = self._kv + prefix.encode()
        request: _Json = {
            "key": _b64(start),
            "range_end": _b64(_prefix_end(start)),
            "limit": _LIST_PAGE,
            "sort_order": "ASCEND",
            "sort_target": "KEY",
        }

        def read() -> list[Entry]:
            entries: list[Entry] = []
            while True:
                answer = self._call("kv/range", request, doing)
                kvs = self._kvs(answer)
                entries.extend(self._entry(kv) for kv in kvs)
                if not answer.get("more") or not kvs:
                    return entries
                # Next page: after the last key, at the revision of the first page.
                request["key"] = _b64(_unb64(kvs[-1]["key"]) + b"\0")
                request["revision"] = _header_revision(answer)

        return self._run(doing, read)

    def revisions(self, prefixes: Sequence[str]) -> dict[str, int]:
        check_prefixes(*prefixes)
        if not prefixes:
            return {}
        doing = f"reading the revisions under {list(prefixes)!r}"
        # One read-only transaction (served as one linearizable read, never through the log):
        # a consistent snapshot of every prefix in one round trip, keys and revisions only.
        ranges = []
        for prefix in prefixes:
            start = self._kv + prefix.encode()
            ranges.append(
                {
                    "request_range": {
                        "key": _b64(start),
                        "range_end": _b64(_prefix_end(start)),
                        "keys_only": True,
                    }
                }
            )

        def read() -> dict[str, int]:
            answer = self._call("kv/txn", {"success": ranges}, doing, repeatable=True)
            responses = answer.get("responses", [])
            if not isinstance(responses, list) or len(responses) != len(ranges):
                raise _BadAnswer(f"{len(ranges)} ranges read, answered: {responses!r:.200}")
            found: dict[str, int] = {}
            for response in responses:
                for kv in self._kvs(response["response_range"]):
                    entry = self._entry(kv)
                    found[entry.key] = entry.revision
            return found

        return self._run(doing, read)

    def commit(self, ops: Sequence[Put | Delete]) -> int:
        check_ops(ops)
        doing = f"committing {len(ops)} operation(s)"
        revision, _ = self._run(doing, lambda: self._txn(ops, doing))
        return revision

    # --- locks --------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_lock(name, owner, ttl)
        doing = f"taking lock {name!r} for {owner!r}"
        lock_key = _b64(self._locks + name.encode())

        def take() -> bool:
            held = self._lock_record(lock_key, doing)
            if held is not None:
                holder, lease = held
                if holder != owner:
                    return False
                if self._keepalive(lease, doing):
                    return True
                # Our lease ran out between the read and the keepalive: take the lock afresh.
            granted = self._call("lease/grant", {"TTL": _lease_ttl(ttl)}, doing)
            if granted.get("error"):  # LeaseGrantResponse has its own error field
                raise self._error(doing, f"etcd refused lease/grant: {granted['error']}")
            lease = int(granted["ID"])
            answer = self._call(
                "kv/txn",
                {
                    "compare": [_compare(lock_key, 0)],
                    "success": [
                        {
                            "request_put": {
                                "key": lock_key,
                                "value": _b64(owner.encode()),
                                "lease": lease,
                            }
                        }
                    ],
                    "failure": [{"request_range": {"key": lock_key}}],
                },
                doing,
            )
            if answer.get("succeeded"):
                return True
            self._revoke(lease, doing)  # the lease we did not use
            kvs = self._kvs(answer["responses"][0]["response_range"])
            # Another thread of this same owner may have won the race: then owner holds it.
            return bool(kvs) and _unb64(kvs[0].get("value", "")).decode() == owner

        return self._run(doing, take)

    def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_lock(name, owner, ttl)
        doing = f"refreshing lock {name!r} for {owner!r}"
        lock_key = _b64(self._locks + name.encode())

        def refresh() -> bool:
            held = self._lock_record(lock_key, doing)
            return held is not None and held[0] == owner and self._keepalive(held[1], doing)

        return self._run(doing, refresh)

    def unlock(self, name: str, owner: str) -> None:
        check_lock(name, owner)
        doing = f"releasing lock {name!r} for {owner!r}"
        lock_key = _b64(self._locks + name.encode())

        def release() -> None:
            held = self._lock_record(lock_key, doing)
            if held is not None and held[0] == owner:
                # Revoking the lease deletes the key. It is this owner's own lease, so even if it
                # expired meanwhile and someone else took the lock, their lease is untouched.
                self._revoke(held[1], doing)

        self._run(doing, release)

    def lock_holder(self, name: str) -> str | None:
        check_lock(name)
        doing = f"reading lock {name!r}"
        lock_key = _b64(self._locks + name.encode())

        def read() -> str | None:
            held = self._lock_record(lock_key, doing)
            return None if held is None else held[0]

        return self._run(doing, read)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    # --- internals ----------------------------------------------------------------------

    def _error(self, doing: str, what: str) -> StoreError:
        return StoreError(
            f"etcd store at {self._endpoint} (prefix {self._prefix!r}): {doing}: {what}"
        )

    def _run(self, doing: str, work: Callable[[], _T]) -> _T:
        """Run ``work``, turning a malformed etcd answer into :class:`StoreError`."""
        if self._closed:
            raise self._error(doing, "the store is closed")
        if self._tls is not None:
            try:
                self._tls.follow()
            except (OSError, ssl.SSLError) as exc:
                raise self._error(doing, _tls_problem(self._tls.tls, exc)) from exc
        try:
            return work()
        except (_BadAnswer, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise self._error(
                doing, f"unexpected answer from etcd ({type(exc).__name__}: {exc})"
            ) from exc

    def _post(
        self, path: str, body: _Json, doing: str, repeatable: bool | None = None
    ) -> httpx.Response:
        """POST to the first member that takes the request (see the module docstring).
        ``repeatable``: whether sending it twice changes nothing (default: by ``path``; a
        read-only transaction says so itself)."""
        count = len(self._endpoints)
        if repeatable is None:
            repeatable = path in _REPEATABLE
        first = self._current
        failures: list[str] = []
        # Another round, after a pause, while a member answered that it has no leader: an
        # election takes a moment (longer on a busy host, or after a member restarted).
        attempts = _ELECTION_ROUNDS * count if count > 1 else 1
        for attempt in range(attempts):
            index = (first + attempt) % count
            endpoint = self._endpoints[index]
            if attempt and attempt % count == 0:
                # Every request of the last round failed (one that did not returned).
                if not any(_NO_LEADER in f for f in failures[-count:]):
                    break  # every member refused the connection: no election to wait for
                time.sleep(_ELECTION_PAUSE)
            try:
                response = self._client.post(f"{endpoint}/v3/{path}", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{endpoint}: {_one_line(exc)}")
                continue
            except httpx.TransportError as exc:
                if not repeatable:
                    error = self._error(
                        doing, f"cannot reach etcd at {endpoint} ({type(exc).__name__}: {exc})"
                    )
                    if count > 1 and path == "kv/txn":
                        self._current = (index + 1) % count
                        raise _MaybeApplied(error) from exc
                    raise error from exc
                # Sent, maybe applied, but applying it twice changes nothing: the next member.
                failures.append(f"{endpoint}: {_one_line(exc)}")
                continue
            except httpx.HTTPError as exc:
                raise self._error(
                    doing, f"cannot reach etcd at {endpoint} ({type(exc).__name__}: {exc})"
                ) from exc
            except RuntimeError as exc:  # httpx: the client was closed by another thread
                raise self._error(doing, f"the store is closed ({exc})") from exc
            # A read refused with a server error (e.g. "request timed out" while the members
            # elect a leader) is repeatable whatever the reason.
            refused = _not_applied(response) or (repeatable and response.status_code >= 500)
            if attempt < attempts - 1 and count > 1 and refused:
                failures.append(f"{endpoint}: {_NO_LEADER}: {_describe_failure(path, response)}")
                continue
            self._current = index
            return response
        if count == 1:
            raise self._error(doing, f"cannot reach etcd ({failures[0].split(': ', 1)[1]})")
        raise self._error(
            doing, f"cannot reach etcd: no member took the request ({'; '.join(failures)})"
        )

    def _post_ok(
        self, path: str, body: _Json, doing: str, repeatable: bool | None = None
    ) -> httpx.Response:
        """POST to the gateway; StoreError unless it answers 200."""
        response = self._post(path, body, doing, repeatable)
        if response.status_code != 200:
            raise self._error(doing, _describe_failure(path, response))
        return response

    def _call(self, path: str, body: _Json, doing: str, repeatable: bool | None = None) -> _Json:
        """POST one unary gateway request; return its JSON answer or raise StoreError."""
        return _json_object(self._post_ok(path, body, doing, repeatable).text, path)

    def _keepalive(self, lease: int, doing: str) -> bool:
        """Renew ``lease``; ``False`` if it no longer exists (the lock already expired)."""
        if lease == 0:
            return False  # not a leased key: not one of our locks
        response = self._post_ok("lease/keepalive", {"ID": lease}, doing)
        # A streaming call: the gateway answers one {"result": ...} or {"error": ...} object per
        # line. We sent one request, so the first line is its answer.
        lines = [line for line in response.text.splitlines() if line.strip()]
        if not lines:
            raise _BadAnswer("lease/keepalive answered nothing")
        message = _json_object(lines[0], "lease/keepalive")
        if "error" in message:
            raise self._error(
                doing, f"etcd refused lease/keepalive: {_error_text(message['error'])}"
            )
        # etcd answers TTL 0 (omitted in JSON) for a lease that does not exist any more.
        return int(message["result"].get("TTL", 0)) > 0

    def _revoke(self, lease: int, doing: str) -> None:
        """Revoke ``lease`` (deleting the keys attached to it); an unknown lease is no error."""
        response = self._post("lease/revoke", {"ID": lease}, doing)
        if response.status_code == 404 and "lease not found" in response.text:
            return
        if response.status_code != 200:
            raise self._error(doing, _describe_failure("lease/revoke", response))

    def _lock_record(self, lock_key: str, doing: str) -> tuple[str, int] | None:
        """The (owner, lease) of a lock key, or ``None`` if nobody holds it."""
        kvs = self._kvs(self._call("kv/range", {"key": lock_key}, doing))
        if not kvs:
            return None
        return _unb64(kvs[0].get("value", "")).decode(), int(kvs[0].get("lease", 0))

    def _txn(self, ops: Sequence[Put | Delete], doing: str) -> tuple[int, bool]:
        """Apply ``ops`` in one etcd transaction guarded by their expectations.

        Returns the transaction's revision and whether any key was deleted.
        """
        guarded = [op for op in ops if op.expect_revision is not None]
        keys = {op.key: _b64(self._kv + op.key.encode()) for op in ops}
        success: _Jsons = []
        for op in ops:
            if isinstance(op, Put):
                success.append(
                    {"request_put": {"key": keys[op.key], "value": _b64(op.value.encode())}}
                )
            else:
                success.append({"request_delete_range": {"key": keys[op.key]}})
        body = {
            "compare": [_compare(keys[op.key], op.expect_revision) for op in guarded],
            "success": success,
            "failure": [{"request_range": {"key": keys[op.key]}} for op in guarded],
        }
        try:
            answer = self._call("kv/txn", body, doing)
        except _MaybeApplied:
            # The member died with the transaction in flight. Read back whether it landed; if
            # not, send it once more (to the next member). Its compares make a late landing of
            # the first one turn the second into a conflict, never a double write.
            landed = self._landed(ops, keys, doing)
            if landed is not None:
                return landed
            try:
                answer = self._call("kv/txn", body, doing)
            except _MaybeApplied as again:
                raise again.error from None
        responses: _Jsons = answer.get("responses", [])
        if not answer.get("succeeded"):
            # The failure branch read every guarded key at the revision the compares saw.
            for op, response in zip(guarded, responses, strict=True):
                kvs = self._kvs(response["response_range"])
                found = int(kvs[0]["mod_revision"]) if kvs else 0
                assert op.expect_revision is not None
                if not expectation_holds(op.expect_revision, found):
                    raise conflict(op.key, op.expect_revision, found)
            raise StoreConflict(f"compare-and-set lost on one of {[op.key for op in guarded]!r}")
        deleted = any(
            int(response.get("response_delete_range", {}).get("deleted", 0)) > 0
            for response in responses
        )
        return _header_revision(answer), deleted

    def _landed(
        self, ops: Sequence[Put | Delete], keys: dict[str, str], doing: str
    ) -> tuple[int, bool] | None:
        """What :meth:`_txn` returns if ``ops`` are in the store as written by one transaction
        (every put's value there, all at one revision that none of them expected; every
        deleted key absent), else ``None``."""
        revisions: set[int] = set()
        revision = 0
        for op in ops:
            answer = self._call("kv/range", {"key": keys[op.key]}, doing)
            revision = max(revision, _header_revision(answer))
            kvs = self._kvs(answer)
            if isinstance(op, Delete):
                if kvs:
                    return None
                continue
            if not kvs or _unb64(kvs[0].get("value", "")).decode() != op.value:
                return None
            found = int(kvs[0]["mod_revision"])
            if op.expect_revision is not None and found == op.expect_revision:
                return None  # the same value was there before: not this transaction's write
            revisions.add(found)
        if len(revisions) > 1:
            return None
        deleted = any(isinstance(op, Delete) for op in ops)
        return (revisions.pop() if revisions else revision), deleted

    def _kvs(self, answer: _Json) -> _Jsons:
        kvs = answer.get("kvs", [])
        if not isinstance(kvs, list):
            raise _BadAnswer(f"'kvs' is {type(kvs).__name__}, not a list")
        return kvs

    def _entry(self, kv: _Json) -> Entry:
        full = _unb64(kv["key"])
        if not full.startswith(self._kv):
            raise _BadAnswer(f"key {full!r} is outside {self._kv!r}")
        revision = int(kv["mod_revision"])
        if revision <= 0:
            raise _BadAnswer(f"key {full!r} has mod_revision {revision}")
        return Entry(
            key=full[len(self._kv) :].decode(),
            value=_unb64(kv.get("value", "")).decode(),
            revision=revision,
        )


# --- the gateway's JSON ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise _BadAnswer(f"not base64: {text!r}") from exc


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd: every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _compare(key: str, expect_revision: int | None) -> _Json:
    """The txn compare for an expectation: absent (create_revision 0) or at mod_revision n."""
    if expect_revision == 0:
        return {"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}
    return {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": expect_revision}


def _lease_ttl(ttl: float) -> int:
    """etcd lease TTLs are whole seconds: round up so a lock is never shorter than asked."""
    return max(1, math.ceil(ttl))


def _header_revision(answer: _Json) -> int:
    revision = int(answer["header"]["revision"])
    if revision <= 0:
        raise _BadAnswer(f"header revision {revision}")
    return revision


def _json_object(text: str, path: str) -> _Json:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _BadAnswer(
            f"{path} answered with something that is not JSON: {text[:200]!r}"
        ) from exc
    if not isinstance(value, dict):
        raise _BadAnswer(f"{path} answered {type(value).__name__}, not a JSON object")
    return value


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# What a member answers when it cannot serve a request it did not apply: another member may.
_NOT_APPLIED = ("no leader", "not capable", "unhealthy cluster", "leader changed")
_NO_LEADER = "not served"
# Requests whose repetition changes nothing: after a member dies with one in flight they go to
# the next member. A transaction may have been applied; it is never sent twice.
_REPEATABLE = frozenset({"kv/range", "lease/revoke", "lease/keepalive"})
_ELECTION_PAUSE = 0.5  # seconds before another round
_ELECTION_ROUNDS = 5  # an election may take up to about 2 s before the request is refused


def _not_applied(response: httpx.Response) -> bool:
    return response.status_code >= 500 and any(m in response.text for m in _NOT_APPLIED)


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("error") or error)
    return str(error)


def _tls_problem(tls: EtcdTLS, exc: Exception) -> str:
    return (
        f"the TLS files do not load (CA {tls.ca_file}, certificate {tls.cert_file}, key "
        f"{tls.key_file}): {type(exc).__name__}: {exc}"
    )


def _describe_failure(path: str, response: httpx.Response) -> str:
    """Say what etcd answered to a non-200: its gRPC error message when it sent one."""
    try:
        body = json.loads(response.text)
    except ValueError:
        body = None
    if isinstance(body, dict) and ("message" in body or "error" in body):
        return f"etcd refused {path} (HTTP {response.status_code}): {_error_text(body)}"
    return (
        f"{path} answered HTTP {response.status_code} {response.reason_phrase}, not etcd's "
        f"JSON gateway: {response.text[:200]!r} (is the endpoint an etcd v3.4+ client URL?)"
    )
