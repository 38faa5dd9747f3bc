"""The control plane's records in the store, and the key layout they use.

Key layout (the store itself is layout-agnostic)::

    meta/cluster                   {"name", "sans", "internal_cert_seconds", "next_node_id",
                                    "next_uid"}
    meta/settings                  alert and rotation-job settings (:mod:`.settings`)
    alerts/<alert name>            the alert's last evaluated state (:mod:`.alerts`)
    certs/<name>                   desired certificate: generation, chain, sealed key, ...
    nodes/<node_id>                a joined node: name, agent URL
    applied/<node_id>/<name>       what the node last proved it serves
    meta/applied                   touched in every commit that writes or deletes a proof
    meta/membership                touched in every commit that adds, changes or removes a
                                   node or adds a control plane's name
    users/<email>                  a user: uid, role, scrypt hash
    tokens/<sha256 of token>       a one-time join token and its expiry
    events/<zero-padded sequence>  the audit history
    rollouts/current               the rollout in flight, if any (phase trusting, staging,
                                   decided or retiring)
    rollouts/generations           per name, the highest generation ever staged (never reused)
    trust/roots                    the roots pinned in every redis trust bundle (control/trust.py)
    ca/internal                    the internal CA (sealed key), the control plane's internode
                                   identity, and the CA rotation's phase (control/carotation.py)

Private keys are sealed (AES-GCM, :mod:`clustercert.sealing`) before they reach the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Concatenate, ParamSpec, TypeVar

from clustercert.clock import iso
from clustercert.control.audit import AuditEvent
from clustercert.control.settings import ClusterSettings
from clustercert.errors import InsufficientPermissions, StoreConflict, UndeletableUser, UserExists
from clustercert.roles import permissions_of
from clustercert.sealing import KeySealer
from clustercert.store import Delete, Put, Store

__all__ = [
    "DEFAULT_INTERNAL_VALIDITY",
    "GENERATIONS_KEY",
    "ROLLOUT_KEY",
    "TRUST_KEY",
    "AppliedRecord",
    "CaRecord",
    "CertRecord",
    "ClusterState",
    "NodeRecord",
    "RolloutRecord",
    "TrustRecord",
    "User",
    "proves",
    "run_blocking",
]

# Redis Enterprise's internal certificates live 90 days and are renewed 60 days before expiry.
DEFAULT_INTERNAL_VALIDITY = dt.timedelta(days=90)
ROLLOUT_KEY = "rollouts/current"
SETTINGS_KEY = "meta/settings"
GENERATIONS_KEY = "rollouts/generations"
TRUST_KEY = "trust/roots"
CA_KEY = "ca/internal"
MEMBERSHIP_KEY = "meta/membership"  # see the key layout
# Touched in the same commit as every change under applied/: its revision says whether the
# proofs moved (applied_revision) without listing them, 7 per node.
APPLIED_KEY = "meta/applied"
# What the control plane's loops poll (every second): their revisions are read together, in one
# store read, and only the records that moved are read in full (polled_revisions).
_POLLED = ("meta/", "certs/", ROLLOUT_KEY, TRUST_KEY)

_P = ParamSpec("_P")
_R = TypeVar("_R")

# Keys per store commit: below etcd's default --max-txn-ops of 128.
_MAX_OPS = 100


def _in_thread(
    method: Callable[Concatenate[ClusterState, _P], _R],
) -> Callable[Concatenate[ClusterState, _P], Coroutine[Any, Any, _R]]:
    """Run a blocking store method in a worker thread: the event loop never waits on SQLite's
    fsync or an etcd round trip (docs/decisions.md, "The store off the event loop")."""

    async def off_loop(self: ClusterState, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await asyncio.to_thread(method, self, *args, **kwargs)

    off_loop.__name__, off_loop.__doc__ = method.__name__, method.__doc__
    return off_loop


def run_blocking(coroutine: Coroutine[Any, Any, _R]) -> _R:
    """Run a :class:`ClusterState` coroutine from synchronous code (commands, the demo). It
    runs on its own thread and loop, so it works even where the calling thread already runs
    an event loop (e.g. a test driving Playwright's sync API)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blocking") as pool:
        return pool.submit(asyncio.run, coroutine).result()


@dataclass(frozen=True)
class User:
    uid: int
    email: str
    name: str
    role: str
    password_hash: str
    auth_method: str = "regular"
    certificate_subject_line: str | None = None

    @property
    def permissions(self) -> frozenset[str]:
        return permissions_of(self.role)

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise InsufficientPermissions(
                f"user {self.email} (role {self.role}) lacks the permission {permission}"
            )

    def public(self) -> dict[str, Any]:
        """What the API shows of a user: never the password hash."""
        body: dict[str, Any] = {
            "uid": self.uid,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "auth_method": self.auth_method,
        }
        if self.certificate_subject_line is not None:
            body["certificate_subject_line"] = self.certificate_subject_line
        return body


@dataclass(frozen=True)
class CertRecord:
    """The desired state of one certificate name."""

    name: str
    generation: int
    certificate: str  # PEM chain, leaf first
    key: str | None  # plaintext PEM in memory only; sealed in the store
    fingerprint: str
    not_after: str
    source: str  # "internal" (issued by the cluster CA) or "user"
    updated_at: str
    updated_by: str
    revision: int = 0  # store revision it was read at (0: not stored yet)


@dataclass(frozen=True)
class NodeRecord:
    node_id: int
    name: str
    agent_url: str
    joined_at: str


@dataclass(frozen=True)
class AppliedRecord:
    """What a node last proved: the generation it committed and what its services serve."""

    generation: int
    fingerprint: str
    ok: bool
    services: list[dict[str, Any]] = field(default_factory=list)
    at: str = ""


def _applied_moved() -> Put:
    """The operation that goes into every commit changing a proof (see APPLIED_KEY)."""
    return Put(APPLIED_KEY, "{}")


def _membership_moved() -> Put:
    """The operation that goes into every commit changing the membership (MEMBERSHIP_KEY)."""
    return Put(MEMBERSHIP_KEY, "{}")


def proves(applied: AppliedRecord | None, generation: int) -> bool:
    """Whether a node's proof (``applied``, None when it proved nothing) shows it serves
    ``generation``: the one "in sync" rule of the API, the console and the rollout."""
    return applied is not None and applied.ok and applied.generation == generation


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout in flight (DESIGN §6): written before the first node stages, turned to phase
    ``decided`` by the same atomic store commit that makes its generations desired, and deleted
    when the rollout ends. A control plane that finds one left over knows what it must finish:
    abort (``staging``) or roll forward (``decided``)."""

    rollout_id: str
    phase: str  # "trusting" | "staging" | "decided" | "retiring"
    generations: dict[str, int]  # name -> the generation this rollout stages
    fingerprints: dict[str, str]  # name -> the new leaf fingerprint
    previous: dict[str, str | None]  # name -> the fingerprint it replaces (audit)
    actor: str
    owner: str  # the cluster-lock owner of the control plane that started it
    started_at: str
    revision: int = 0  # store revision it was read or written at (0: not stored yet)
    # Phase "trusting": the roots (PEM) this rollout is adding to every trust bundle.
    trust_added: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrustRecord:
    """The roots (PEM, one certificate each) pinned in every node's redis trust bundle."""

    roots: list[str] = field(default_factory=list)
    revision: int = 0  # 0: never written


@dataclass(frozen=True)
class CaRecord:
    """The internal CA as the store holds it: the authority every control plane sharing the
    store signs with and trusts (docs/decisions.md, "The internal CA lives in the store").

    ``cert``/``key`` is the established CA and ``identity_cert``/``identity_key`` the control
    plane's internode identity (clientAuth, issued by it). During a rotation ``new_*`` hold
    the next CA and the control plane's next identity, and ``phase`` says how far the rotation
    got (``trusting``, ``reissuing``, ``switching``, ``retiring``; ``idle`` before any
    rotation, ``done`` after one). Keys are PEM here and sealed in the store."""

    phase: str
    cert: str
    key: str
    identity_cert: str
    identity_key: str
    new_cert: str | None = None
    new_key: str | None = None
    new_identity_cert: str | None = None
    new_identity_key: str | None = None
    rotation: int = 0  # how many rotations were started
    actor: str = ""
    started_at: str = ""
    finished_at: str = ""
    phase_started: dict[str, str] = field(default_factory=dict)  # phase -> when it began
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> progress
    waiting: tuple[str, ...] = ()  # the nodes the current phase waits for, by name
    rollouts: int = 0  # certificate rollouts this rotation ran
    revision: int = 0

    _KEYS = ("key", "identity_key", "new_key", "new_identity_key")

    @property
    def rotating(self) -> bool:
        return self.new_cert is not None


class ClusterState:
    """Typed access to the control plane's records.

    Every method that reads or writes the store is a coroutine that does its store I/O in a
    worker thread (one thread hop per call, however many store calls it makes); the pure
    encoders are plain methods. Thread-safe as the store is."""

    def __init__(self, store: Store, sealer: KeySealer, poll_age: float = 0.0) -> None:
        self.store = store
        self.sealer = sealer
        # How old an answer to a poll's change check may be (see polled_revisions).
        self.poll_age = poll_age
        self._polled: tuple[float, dict[str, int]] | None = None
        self._polling: asyncio.Future[dict[str, int]] | None = None  # the read under way
        # The last listing of every proof, with the proofs marker's revision read before it.
        self._applied: tuple[int, dict[int, dict[str, AppliedRecord]]] | None = None

    async def polled_revisions(self, *, recent: bool = False) -> dict[str, int]:
        """The revisions of every key the loops poll (certificates, membership, proofs
        marker, rollout in flight, pinned roots), in one store read. ``recent``: a read made
        up to ``poll_age`` seconds ago will do: every loop that polls each second shares one
        read instead of each making its own (an etcd round trip each; docs/decisions.md,
        "One read for every poll"). Never ``recent`` where a decision needs the store's
        present state, under the lock."""
        polled, reading = self._polled, self._polling
        started = time.monotonic()
        if recent and polled is not None and started - polled[0] < self.poll_age:
            return polled[1]
        if recent and reading is not None and reading.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(reading)  # a read already under way will do
        task = asyncio.ensure_future(asyncio.to_thread(self.store.revisions, _POLLED))
        self._polling = task
        try:
            revisions = await asyncio.shield(task)
        finally:
            if self._polling is task:
                self._polling = None
        self._polled = (started, revisions)
        return revisions

    # --- cluster ------------------------------------------------------------------------

    @_in_thread
    def cluster_name(self) -> str:
        entry = self.store.get("meta/cluster")
        return str(json.loads(entry.value)["name"]) if entry else "cluster.local"

    @_in_thread
    def control_plane_names(self) -> list[str]:
        """The names and addresses the control planes are reached by (``init --san``,
        ``server --advertise``): the ``api`` and ``cm`` certificates name them."""
        entry = self.store.get("meta/cluster")
        return list(json.loads(entry.value).get("sans", [])) if entry else []

    @_in_thread
    def add_control_plane_names(self, names: Sequence[str]) -> list[str]:
        """Add ``names`` to the control planes' names (compare-and-set, retried); return the
        names that were new."""
        while True:
            entry = self.store.get("meta/cluster")
            if entry is None:
                raise ValueError("the cluster is not initialised")
            meta = json.loads(entry.value)
            known = list(meta.get("sans", []))
            new = [n for n in dict.fromkeys(names) if n not in known]
            if not new:
                return []
            meta["sans"] = known + new
            try:
                self.store.commit(
                    [
                        Put("meta/cluster", json.dumps(meta), expect_revision=entry.revision),
                        _membership_moved(),
                    ]
                )
            except StoreConflict:
                continue
            return new

    @_in_thread
    def internal_cert_validity(self) -> dt.timedelta:
        """How long autogenerated certificates are valid (``init --internal-cert-days``);
        clusters initialised before the option existed get the default."""
        entry = self.store.get("meta/cluster")
        seconds = json.loads(entry.value).get("internal_cert_seconds") if entry else None
        return dt.timedelta(seconds=int(seconds)) if seconds else DEFAULT_INTERNAL_VALIDITY

    def _next_id(self, counter: str) -> int:
        while True:
            entry = self.store.get("meta/cluster")
            if entry is None:
                raise ValueError("the cluster is not initialised")
            meta = json.loads(entry.value)
            value = int(meta.get(counter, 1))
            meta[counter] = value + 1
            try:
                self.store.put("meta/cluster", json.dumps(meta), expect_revision=entry.revision)
            except StoreConflict:
                continue
            return value

    # --- settings (meta/settings) --------------------------------------------------------

    @_in_thread
    def settings(self) -> ClusterSettings:
        """The alert and rotation-job settings; the defaults until a PUT changed them."""
        entry = self.store.get(SETTINGS_KEY)
        return ClusterSettings.model_validate_json(entry.value) if entry else ClusterSettings()

    @_in_thread
    def replace_settings(
        self, change: Callable[[ClusterSettings], ClusterSettings]
    ) -> tuple[ClusterSettings, ClusterSettings]:
        """Apply ``change`` to the stored settings and store the result; return (old, new).
        Atomic: compare-and-set on ``meta/settings``, ``change`` re-applied on a concurrent
        write (so it must be pure); raises :class:`StoreConflict` after five races in a row."""
        for _ in range(5):
            entry = self.store.get(SETTINGS_KEY)
            old = ClusterSettings.model_validate_json(entry.value) if entry else ClusterSettings()
            new = change(old)
            try:
                self.store.put(
                    SETTINGS_KEY,
                    new.model_dump_json(),
                    expect_revision=entry.revision if entry else 0,
                )
            except StoreConflict:
                continue
            return old, new
        raise StoreConflict("the settings changed concurrently five times in a row; retry")

    # --- alert states (alerts/<name>) -----------------------------------------------------

    @_in_thread
    def alert_states(self) -> dict[str, tuple[dict[str, Any], int]]:
        """Each alert's stored state (its JSON form) and the revision it was read at."""
        return {
            e.key.removeprefix("alerts/"): (json.loads(e.value), e.revision)
            for e in self.store.list("alerts/")
        }

    @_in_thread
    def record_alert(self, name: str, raw: dict[str, Any], expect_revision: int) -> bool:
        """Store alert ``name``'s new state if it is still at ``expect_revision`` (0: never
        stored). False when another control plane recorded it first (then it notifies, not
        the caller): a flip is announced once however many control planes evaluate."""
        try:
            self.store.put("alerts/" + name, json.dumps(raw), expect_revision=expect_revision)
        except StoreConflict:
            return False
        return True

    # --- certificates -------------------------------------------------------------------

    def _decode_cert(self, value: str, revision: int) -> CertRecord:
        raw = json.loads(value)
        sealed = raw.pop("key_sealed", None)
        key = self.sealer.open(sealed, "certs/" + raw["name"]) if sealed else None
        return CertRecord(**raw, key=key, revision=revision)

    def encode_cert(self, record: CertRecord) -> str:
        raw = asdict(record)
        raw.pop("revision")
        key = raw.pop("key")
        raw["key_sealed"] = self.sealer.seal(key, "certs/" + record.name) if key else None
        return json.dumps(raw)

    @_in_thread
    def certificate(self, name: str) -> CertRecord | None:
        entry = self.store.get("certs/" + name)
        return self._decode_cert(entry.value, entry.revision) if entry else None

    async def revision(self, name: str, *, recent: bool = False) -> int:
        """The store revision of certificate ``name`` (0 when unset): a cheap change check
        (``recent``: see :meth:`polled_revisions`)."""
        return (await self.polled_revisions(recent=recent)).get("certs/" + name, 0)

    async def desired_revisions(self, *, recent: bool = False) -> tuple[tuple[str, int], ...]:
        """A cheap change check for :meth:`certificates`: each name with its store revision
        (nothing is decoded or unsealed; ``recent``: see :meth:`polled_revisions`)."""
        revisions = await self.polled_revisions(recent=recent)
        return tuple(sorted((k, r) for k, r in revisions.items() if k.startswith("certs/")))

    @_in_thread
    def certificates(self) -> list[CertRecord]:
        return [self._decode_cert(e.value, e.revision) for e in self.store.list("certs/")]

    @_in_thread
    def put_certificate(self, record: CertRecord) -> CertRecord:
        """Compare-and-set against ``record.revision`` (0: must not exist)."""
        revision = self.store.put(
            "certs/" + record.name, self.encode_cert(record), expect_revision=record.revision
        )
        return replace(record, revision=revision)

    @_in_thread
    def delete_certificate(self, record: CertRecord) -> None:
        ops: list[Put | Delete] = [Delete("certs/" + record.name, record.revision)]
        ops += [
            Delete(e.key) for e in self.store.list("applied/") if e.key.endswith("/" + record.name)
        ]
        self.store.commit([*ops, _applied_moved()] if len(ops) > 1 else ops)

    # --- nodes --------------------------------------------------------------------------

    @_in_thread
    def nodes(self) -> list[NodeRecord]:
        return self._nodes()

    def _nodes(self) -> list[NodeRecord]:
        records = [NodeRecord(**json.loads(e.value)) for e in self.store.list("nodes/")]
        return sorted(records, key=lambda n: n.node_id)

    async def membership_revision(self, *, recent: bool = False) -> int:
        """A cheap change check for :meth:`nodes` and the names certificates must carry: the
        revision of ``meta/membership``, moved in the commit of every change to a node record
        and of every control plane's name added (not by ``meta/cluster``, whose counters move
        with every audit event). Every control plane sees a change made through any of them.
        ``recent``: see :meth:`polled_revisions`."""
        return (await self.polled_revisions(recent=recent)).get(MEMBERSHIP_KEY, 0)

    @_in_thread
    def node(self, node_id: int) -> NodeRecord | None:
        entry = self.store.get(f"nodes/{node_id}")
        return NodeRecord(**json.loads(entry.value)) if entry else None

    @_in_thread
    def add_node(self, name: str, agent_url: str, now: dt.datetime) -> NodeRecord:
        for existing in self._nodes():
            if existing.name == name:
                # A node that joins again (e.g. its disk was wiped) keeps its id.
                record = replace(existing, agent_url=agent_url)
                self.store.commit(
                    [
                        Put(f"nodes/{record.node_id}", json.dumps(asdict(record))),
                        _membership_moved(),
                    ]
                )
                return record
        record = NodeRecord(self._next_id("next_node_id"), name, agent_url, iso(now))
        self.store.commit(
            [
                Put(f"nodes/{record.node_id}", json.dumps(asdict(record)), expect_revision=0),
                _membership_moved(),
            ]
        )
        return record

    @_in_thread
    def remove_node(self, node_id: int) -> NodeRecord | None:
        """Delete the node and what it proved, in one atomic commit (the node record checked
        unchanged since read); None if there is no such node. Its events stay (history)."""
        entry = self.store.get(f"nodes/{node_id}")
        if entry is None:
            return None
        ops: list[Put | Delete] = [Delete(entry.key, expect_revision=entry.revision)]
        ops += [Delete(e.key) for e in self.store.list(f"applied/{node_id}/")]
        ops.append(_membership_moved())
        if len(ops) > 2:
            ops.append(_applied_moved())
        self.store.commit(ops)
        return NodeRecord(**json.loads(entry.value))

    @_in_thread
    def applied(self, node_id: int) -> dict[str, AppliedRecord]:
        prefix = f"applied/{node_id}/"
        return {
            e.key[len(prefix) :]: AppliedRecord(**json.loads(e.value))
            for e in self.store.list(prefix)
        }

    @_in_thread
    def applied_by_node(self) -> dict[int, dict[str, AppliedRecord]]:
        """What every node last proved, from one listing: node id -> name -> proof. Listed
        again only when the proofs marker (APPLIED_KEY) moved since the last listing: a
        rollout's proofs are wanted by several readers after it (phase c, the reconciler, the
        alert loop), 7,000 of them at 1,000 nodes; the others get one small read."""
        marker = self.store.get(APPLIED_KEY)
        revision = marker.revision if marker is not None else 0
        listed = self._applied
        if revision == 0 or listed is None or listed[0] != revision:
            everything: dict[int, dict[str, AppliedRecord]] = {}
            for entry in self.store.list("applied/"):
                node_id, _, name = entry.key[len("applied/") :].partition("/")
                proof = AppliedRecord(**json.loads(entry.value))
                everything.setdefault(int(node_id), {})[name] = proof
            # Read after the marker: at least as new as it (a later write moves it again).
            listed = self._applied = (revision, everything)
        return {node_id: dict(proofs) for node_id, proofs in listed[1].items()}

    async def applied_revision(self, *, recent: bool = False) -> int:
        """A cheap change check for :meth:`applied_by_node`: it moves with every proof written
        or deleted (0 for a store no proof was written to since this key exists; ``recent``:
        see :meth:`polled_revisions`)."""
        return (await self.polled_revisions(recent=recent)).get(APPLIED_KEY, 0)

    @_in_thread
    def record_applied(self, node_id: int, name: str, record: AppliedRecord) -> None:
        self.store.commit(
            [Put(f"applied/{node_id}/{name}", json.dumps(asdict(record))), _applied_moved()]
        )

    @_in_thread
    def record_applied_many(self, entries: Sequence[tuple[int, str, AppliedRecord]]) -> None:
        """Record what many nodes proved, in as few store commits as possible (each commit
        atomic; at most 100 keys per commit, below etcd's default --max-txn-ops of 128)."""
        ops = [Put(f"applied/{n}/{name}", json.dumps(asdict(r))) for n, name, r in entries]
        for start in range(0, len(ops), _MAX_OPS - 1):
            self.store.commit([*ops[start : start + _MAX_OPS - 1], _applied_moved()])

    # --- users --------------------------------------------------------------------------

    @_in_thread
    def user(self, email: str) -> User | None:
        entry = self.store.get("users/" + email.lower())
        return User(**json.loads(entry.value)) if entry else None

    @_in_thread
    def users(self) -> list[User]:
        return self._users()

    def _users(self) -> list[User]:
        return [User(**json.loads(e.value)) for e in self.store.list("users/")]

    @_in_thread
    def create_user(
        self,
        email: str,
        name: str,
        role: str,
        password_hash: str,
        *,
        auth_method: str = "regular",
        certificate_subject_line: str | None = None,
    ) -> User:
        """Add a user with the next uid. Atomic: raises :class:`UserExists` when the email is
        taken (compare-and-set on ``users/<email>``)."""
        user = User(
            self._next_id("next_uid"), email.lower(), name, role, password_hash,
            auth_method, certificate_subject_line,
        )  # fmt: skip
        try:
            self.store.put("users/" + user.email, json.dumps(asdict(user)), expect_revision=0)
        except StoreConflict:
            raise UserExists(f"a user with the email {user.email} already exists") from None
        return user

    @_in_thread
    def user_by_uid(self, uid: int) -> User | None:
        return next((u for u in self._users() if u.uid == uid), None)

    @_in_thread
    def certificate_user(self, subject: str) -> User | None:
        """The one ``certificate`` user whose subject line is ``subject`` (RFC 4514 form), or
        None (also when, against the API's checks, several match: ambiguity never logs in)."""
        # Stored subject lines are canonical already (POST /v1/users canonicalises them), so a
        # login compares strings instead of parsing every user's subject on every request.
        matches = [
            u
            for u in self._users()
            if u.auth_method == "certificate" and u.certificate_subject_line == subject
        ]
        return matches[0] if len(matches) == 1 else None

    @_in_thread
    def delete_user(self, uid: int) -> User | None:
        """Delete the user ``uid``; return it, or None when there is none. Atomic: deleting an
        admin commits together with an unchanged rewrite (compare-and-set) of another admin, so
        concurrent deletions can never remove the last admin; that raises
        :class:`UndeletableUser`. Retries a few times on a concurrent change, then raises
        :class:`StoreConflict`."""
        for _ in range(5):
            entries = self.store.list("users/")
            users = [(e, User(**json.loads(e.value))) for e in entries]
            target = next(((e, u) for e, u in users if u.uid == uid), None)
            if target is None:
                return None
            ops: list[Put | Delete] = [Delete(target[0].key, target[0].revision)]
            if target[1].role == "admin":
                others = [e for e, u in users if u.role == "admin" and u.uid != uid]
                if not others:
                    raise UndeletableUser(
                        f"{target[1].email} is the last admin; create another admin first"
                    )
                ops.append(Put(others[0].key, others[0].value, others[0].revision))
            try:
                self.store.commit(ops)
            except StoreConflict:
                continue
            return target[1]
        raise StoreConflict("users changed concurrently five times in a row; retry")

    # --- join tokens --------------------------------------------------------------------

    @_in_thread
    def new_join_token(self, now: dt.datetime, ttl: dt.timedelta) -> str:
        token = secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.store.put(
            "tokens/" + digest,
            json.dumps({"expires_at": (now + ttl).timestamp()}),
            expect_revision=0,
        )
        return token

    @_in_thread
    def consume_join_token(self, token: str, now: dt.datetime) -> bool:
        """True once for a valid, unexpired token; it is deleted atomically (CAS)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self.store.get("tokens/" + digest)
        if entry is None:
            return False
        try:
            self.store.delete(entry.key, expect_revision=entry.revision)
        except StoreConflict:
            return False
        return float(json.loads(entry.value)["expires_at"]) > now.timestamp()

    # --- events -------------------------------------------------------------------------

    @_in_thread
    def add_event(self, event: AuditEvent) -> None:
        self._commit_events([event])

    def _commit_events(
        self,
        events: Sequence[AuditEvent],
        ops: Sequence[Put | Delete] = (),
        unchanged: Callable[[], bool] = lambda: True,
    ) -> None:
        """Commit ``ops`` and ``events``, numbered from meta/cluster's counter, atomically. When
        another writer took the next numbers meanwhile (a conflict), number them again, as long
        as ``unchanged()`` says the conflict was not on one of ``ops`` (else it is raised)."""
        while True:
            entry = self.store.get("meta/cluster")
            if entry is None:
                raise ValueError("the cluster is not initialised")
            meta = json.loads(entry.value)
            first = int(meta.get("next_event", 1))
            meta["next_event"] = first + len(events)
            written = [
                Put(f"events/{n:012d}", json.dumps({"id": n, **event.to_json()}))
                for n, event in enumerate(events, start=first)
            ]
            meta_put = Put("meta/cluster", json.dumps(meta), expect_revision=entry.revision)
            try:
                self.store.commit([*ops, *written, meta_put])
            except StoreConflict:
                if not unchanged():
                    raise
                continue
            return

    @_in_thread
    def events(self) -> list[dict[str, Any]]:
        """Every event, newest first."""
        return [json.loads(e.value) for e in reversed(self.store.list("events/"))]

    # --- the rollout in flight ----------------------------------------------------------

    @_in_thread
    def rollout_in_flight(self) -> RolloutRecord | None:
        """The rollout a control plane started and has not finished, if any."""
        entry = self.store.get(ROLLOUT_KEY)
        if entry is None:
            return None
        return RolloutRecord(**json.loads(entry.value), revision=entry.revision)

    @_in_thread
    def trust(self) -> TrustRecord:
        """The pinned roots (an empty record at revision 0 before the first is written)."""
        entry = self.store.get(TRUST_KEY)
        if entry is None:
            return TrustRecord()
        return TrustRecord(list(json.loads(entry.value)["roots"]), entry.revision)

    @staticmethod
    def encode_trust(record: TrustRecord) -> str:
        return json.dumps({"roots": record.roots})

    @_in_thread
    def ca_record(self) -> CaRecord | None:
        """The internal CA record, or None for a store that never had one (a cluster made
        before the CA moved into the store: the server adopts the directory's files)."""
        entry = self.store.get(CA_KEY)
        if entry is None:
            return None
        raw = json.loads(entry.value)
        for name in CaRecord._KEYS:
            sealed = raw.pop(name + "_sealed", None)
            raw[name] = self.sealer.open(sealed, f"{CA_KEY}/{name}") if sealed else None
        raw["waiting"] = tuple(raw.get("waiting", ()))
        return CaRecord(**raw, revision=entry.revision)

    @_in_thread
    def put_ca_record(self, record: CaRecord, expect_revision: int) -> CaRecord:
        """Store ``record`` if the stored one is still at ``expect_revision`` (0: none yet);
        raises StoreConflict (nothing written) otherwise. Returns it with its new revision."""
        raw = asdict(record)
        raw.pop("revision")
        for name in CaRecord._KEYS:
            key = raw.pop(name)
            raw[name + "_sealed"] = self.sealer.seal(key, f"{CA_KEY}/{name}") if key else None
        raw["waiting"] = list(record.waiting)
        revision = self.store.put(CA_KEY, json.dumps(raw), expect_revision=expect_revision)
        return replace(record, revision=revision)

    @_in_thread
    def put_trust(self, roots: list[str], expect_revision: int) -> None:
        """Record ``roots`` as the pinned set (compare-and-set; StoreConflict if it moved)."""
        self.store.put(
            TRUST_KEY, self.encode_trust(TrustRecord(roots)), expect_revision=expect_revision
        )

    @_in_thread
    def commit_trusted(
        self, roots: list[str], trust_revision: int, staging: RolloutRecord, rollout_revision: int
    ) -> int:
        """The end of trust phase a, in ONE atomic commit: ``roots`` become the pinned set and
        the rollout moves on to ``staging``. StoreConflict, nothing written, if either moved."""
        return self.store.commit(
            [
                Put(TRUST_KEY, self.encode_trust(TrustRecord(roots)), trust_revision),
                Put(ROLLOUT_KEY, self.encode_rollout(staging), rollout_revision),
            ]
        )

    def encode_rollout(self, record: RolloutRecord) -> str:
        raw = asdict(record)
        raw.pop("revision")
        return json.dumps(raw)

    @_in_thread
    def generations_used(self) -> dict[str, int]:
        """Per name, the highest generation any rollout ever staged, decided or not. A new
        generation is above it, so one generation number never names two certificates (a
        late stage request of an aborted rollout cannot collide with a later one)."""
        entry = self.store.get(GENERATIONS_KEY)
        return {str(k): int(v) for k, v in json.loads(entry.value).items()} if entry else {}

    @_in_thread
    def begin_rollout(self, record: RolloutRecord) -> RolloutRecord:
        """Record ``record`` as in flight and its generations as used, in one atomic commit.
        Raises StoreConflict (nothing written) when another rollout is recorded (it must be
        finished first) or another writer raced on the used generations."""
        entry = self.store.get(GENERATIONS_KEY)
        used = json.loads(entry.value) if entry else {}
        for name, generation in record.generations.items():
            used[name] = max(int(used.get(name, 0)), generation)
        revision = self.store.commit(
            [
                Put(ROLLOUT_KEY, self.encode_rollout(record), expect_revision=0),
                Put(
                    GENERATIONS_KEY,
                    json.dumps(used, sort_keys=True),
                    expect_revision=entry.revision if entry else 0,
                ),
            ]
        )
        return replace(record, revision=revision)

    @_in_thread
    def commit_decision(
        self, records: Sequence[CertRecord], decided: RolloutRecord, expect_revision: int
    ) -> int:
        """The rollout's decision in ONE atomic store commit: every record of ``records``
        becomes desired (compare-and-set at its own revision) and the in-flight record becomes
        ``decided`` (compare-and-set at ``expect_revision``). Returns the commit's revision;
        raises StoreConflict with nothing written when anything moved meanwhile."""
        ops = [
            Put("certs/" + r.name, self.encode_cert(r), expect_revision=r.revision) for r in records
        ]
        ops.append(Put(ROLLOUT_KEY, self.encode_rollout(decided), expect_revision=expect_revision))
        return self.store.commit(ops)

    @_in_thread
    def finish_rollout(
        self,
        proofs: Sequence[tuple[int, str, AppliedRecord]],
        events: Sequence[AuditEvent],
        record: RolloutRecord,
    ) -> None:
        """The end of a rollout in ONE atomic commit (when the proofs fit in one): what the
        nodes proved, the audit events, and forgetting ``record`` (compare-and-delete at its
        revision; StoreConflict if it changed). More than ~100 proofs are recorded first, 100
        per commit, as :meth:`record_applied_many` does. Replaces ``record_applied_many``,
        ``add_event`` and ``end_rollout`` one after another: three durable writes or more
        become one."""
        ops = [
            Put(f"applied/{node_id}/{name}", json.dumps(asdict(entry)))
            for node_id, name, entry in proofs
        ]
        room = max(0, _MAX_OPS - len(events) - 3)  # the events, meta/cluster, the delete, ...
        while len(ops) > room:
            self.store.commit([*ops[: _MAX_OPS - 1], _applied_moved()])
            ops = ops[_MAX_OPS - 1 :]
        if ops:
            ops.append(_applied_moved())  # ... and meta/applied

        def still_in_flight() -> bool:
            now = self.store.get(ROLLOUT_KEY)
            return now is not None and now.revision == record.revision

        self._commit_events(
            events, [*ops, Delete(ROLLOUT_KEY, expect_revision=record.revision)], still_in_flight
        )

    @_in_thread
    def end_rollout(self, record: RolloutRecord) -> None:
        """Forget ``record`` (compare-and-delete at its revision; StoreConflict if it changed)."""
        self.store.delete(ROLLOUT_KEY, expect_revision=record.revision)

    # --- control planes (see control/leader.py) ----------------------------------------

    @_in_thread
    def register_control_plane(self, name: str, record: dict[str, Any]) -> None:
        """Record (or refresh) control plane ``name``'s registration."""
        self.store.put(f"control_planes/{name}", json.dumps(record, sort_keys=True))

    @_in_thread
    def control_planes(self) -> list[dict[str, Any]]:
        return [json.loads(e.value) for e in self.store.list("control_planes/")]

    @_in_thread
    def put_node_health(self, snapshot: dict[str, Any]) -> None:
        """The leader's view of each node's reachability (:class:`NodeHealth` snapshot)."""
        self.store.put("health/nodes", json.dumps(snapshot, sort_keys=True))

    @_in_thread
    def node_health(self) -> dict[str, Any] | None:
        entry = self.store.get("health/nodes")
        return dict(json.loads(entry.value)) if entry else None

    # --- the cluster lock (a lease: see control/lock.py) --------------------------------

    @_in_thread
    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        return self.store.try_lock(name, owner, ttl)

    @_in_thread
    def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        return self.store.refresh_lock(name, owner, ttl)

    @_in_thread
    def lock_holder(self, name: str) -> str | None:
        return self.store.lock_holder(name)

    @_in_thread
    def unlock(self, name: str, owner: str) -> None:
        self.store.unlock(name, owner)
