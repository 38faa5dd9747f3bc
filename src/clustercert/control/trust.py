"""Which roots the redis trust bundles of the cluster must hold (DESIGN §13 "Trust phases").

A redis replica verifies its primary's ``proxy``; a primary verifies its replicas'
``data_internode_encryption``; a source outside the cluster may verify ``syncer``. Their
roots are what the bundles must trust. The control plane keeps that set in the store
(``trust/roots``, :class:`~clustercert.control.state.TrustRecord`) and pins it on every agent:

- a root is added (phase *a*) before any certificate chaining to it is staged, and proven on
  every node before the rollout goes on;
- a root is retired (phase *c*) only when no desired certificate chains to it and every node
  has proved the desired generations (so no node still presents an older one).

The internal CA (old and new during a CA rotation) is in every bundle anyway (agents add
it), so it is never pinned.

Crash safety: phase *a* runs under the rollout record (phase ``trusting``, with the roots it
adds); ONE atomic store commit then records the larger set in ``trust/roots`` and moves the
rollout to ``staging``. A control plane that dies before that commit leaves a ``trusting``
record: the next lock holder aborts it and pins the recorded set again (:meth:`restore`).
Phase *c* first records the smaller set, then pins it; a node that missed it is brought to the
recorded set by the reconciler (:meth:`TrustKeeper.sync`), which also retires roots left over
by a rollout that could not retire them (a node lagged).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from cryptography import x509

from clustercert import pki
from clustercert.clock import utc_now
from clustercert.control.agents import Agents
from clustercert.control.audit import TrustEvent
from clustercert.control.faults import Seam
from clustercert.control.outcomes import NodeOutcome
from clustercert.control.state import (
    CertRecord,
    ClusterState,
    NodeRecord,
    RolloutRecord,
    TrustRecord,
    proves,
)
from clustercert.errors import AgentUnavailable, NodesNotUpdated, StoreConflict, UpdateInProgress
from clustercert.internode import StatusAnswer, TrustAnswer
from clustercert.validation import TrustStore

__all__ = ["PEER_TRUSTED", "TrustKeeper", "chain_root", "roots_to_add", "roots_to_retire"]

log = logging.getLogger("clustercert.trust")

# The names whose certificates a peer presents: redis on a replication link, an etcd member to
# the other members (DESIGN §3).
PEER_TRUSTED = frozenset(
    {"proxy", "data_internode_encryption", "syncer", "ccs_internode_encryption"}
)

_MAX_DEPTH = 8


# chain_root's answers by chain text, with the anchors they were found in: every rollout asks
# for the roots of every desired certificate (phases a and c), which parses each chain and
# verifies one to three signatures; the same chains come back rotation after rotation.
_ROOTS: dict[str, tuple[TrustStore, x509.Certificate | None]] = {}
_ROOTS_MAX = 256


def chain_root(chain_pem: str, anchors: TrustStore) -> x509.Certificate | None:
    """The self-signed root a validated chain ends in: its last certificate when that is
    self-signed, otherwise the anchor (found by name and signature) that issued it. None when
    no self-signed root is known (an anchor that is itself an intermediate)."""
    cached = _ROOTS.get(chain_pem)
    if cached is not None and cached[0] is anchors:
        return cached[1]
    root = _find_root(chain_pem, anchors)
    if len(_ROOTS) >= _ROOTS_MAX:
        _ROOTS.clear()
    _ROOTS[chain_pem] = (anchors, root)
    return root


def _find_root(chain_pem: str, anchors: TrustStore) -> x509.Certificate | None:
    top = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
    for _ in range(_MAX_DEPTH):
        if pki.is_self_signed(top):
            return top
        issuers = [a for a in anchors.issuers_named(top.issuer) if pki.is_issued_by(top, a)]
        if not issuers:
            return None
        top = issuers[0]
    return None


def _by_fingerprint(certs: Iterable[x509.Certificate]) -> dict[str, x509.Certificate]:
    return {pki.fingerprint_sha256(c): c for c in certs}


def roots_to_add(
    chains: Iterable[str],
    pinned: Mapping[str, x509.Certificate],
    anchors: TrustStore,
    internal_cas: Sequence[x509.Certificate],
) -> dict[str, x509.Certificate]:
    """The roots of ``chains`` (certificates about to be staged) that are neither pinned nor
    an internal CA (old and new during a CA rotation), by SHA-256 fingerprint."""
    roots = _by_fingerprint(r for c in chains if (r := chain_root(c, anchors)) is not None)
    skip = {*pinned, *(pki.fingerprint_sha256(c) for c in internal_cas)}
    return {f: r for f, r in roots.items() if f not in skip}


def roots_to_retire(
    pinned: Mapping[str, x509.Certificate], desired_chains: Iterable[str], anchors: TrustStore
) -> set[str]:
    """The pinned roots no desired certificate chains to any more. Call it only when every
    node has proved the desired generations: a lagging node may still present an old one."""
    used = _by_fingerprint(r for c in desired_chains if (r := chain_root(c, anchors)) is not None)
    return {f for f in pinned if f not in used}


def _pem(cert: x509.Certificate) -> str:
    return pki.certificates_to_pem([cert])


def _parse(pems: Iterable[str]) -> dict[str, x509.Certificate]:
    return _by_fingerprint(x509.load_pem_x509_certificate(p.encode()) for p in pems)


class TrustKeeper:
    """Phases *a* and *c* of a rollout, and keeping every node's pinned roots as recorded."""

    def __init__(
        self,
        state: ClusterState,
        pool: Agents,
        anchors: TrustStore,
        internal_cas: Sequence[x509.Certificate],
        clock: Callable[[], dt.datetime] = utc_now,
        on_pinned: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        """``on_pinned``: told the larger set of roots once every node trusts it, before the
        rollout goes on (the control plane's own etcd client trusts it then, storetrust.py)."""
        self.on_pinned = on_pinned
        self.clock = clock
        self.state = state
        self.pool = pool
        # Both replaced when the internal CA rotates (control/carotation.py).
        self.anchors = anchors
        self.internal_cas = internal_cas
        self._pinned: tuple[int, dict[str, x509.Certificate]] = (-1, {})
        # Whether each node runs an etcd member, by its last status (:meth:`learn`).
        self._etcd_member: dict[int, bool] = {}

    def learn(self, node_id: int, status: StatusAnswer) -> None:
        """Remember from ``status`` whether the node runs an etcd member (the reconciler
        tells every status it reads; a node that never said is treated as running one)."""
        if status.etcd_member is None:
            self._etcd_member.pop(node_id, None)
        else:
            self._etcd_member[node_id] = status.etcd_member

    async def recorded(self) -> tuple[TrustRecord, frozenset[str]]:
        """The recorded pins and their fingerprints (parsed once per store revision: the
        reconciler compares every node's pins with them on every pass)."""
        record = await self.state.trust()
        return record, frozenset(self._parsed(record))

    def _parsed(self, record: TrustRecord) -> dict[str, x509.Certificate]:
        """The recorded pins by fingerprint, parsed once per store revision (do not mutate)."""
        if self._pinned[0] != record.revision:
            self._pinned = (record.revision, _parse(record.roots))
        return self._pinned[1]

    # --- phase a ----------------------------------------------------------------------

    async def needed(self, fresh: Sequence[CertRecord]) -> list[str]:
        """The roots (PEM) to pin before ``fresh`` may be staged: those of the new
        certificates, and of the desired ones they replace (a node that switches first must
        still trust the peers that have not), that are not pinned yet."""
        names = {r.name for r in fresh}
        desired = [r for r in await self.state.certificates() if r.name in names]
        chains = [r.certificate for r in (*fresh, *desired) if r.name in PEER_TRUSTED]
        pinned = self._parsed(await self.state.trust())
        added = roots_to_add(chains, pinned, self.anchors, self.internal_cas)
        return [_pem(added[f]) for f in sorted(added)]

    async def add(
        self, in_flight: RolloutRecord, nodes: Sequence[NodeRecord], seam: Seam
    ) -> RolloutRecord:
        """Phase a: pin ``in_flight.trust_added`` on every node, proven by each node's answer
        (pinned, and in every trust bundle it loaded); then record the larger set and move the
        rollout to ``staging`` in one commit. If a node fails, the recorded set is pinned
        again everywhere (adding a root never broke a link; taking back an unused one does
        not either), the rollout is forgotten, and NodesNotUpdated (409) names the node."""
        record = await self.state.trust()
        roots = [*record.roots, *in_flight.trust_added]
        added = set(_parse(in_flight.trust_added))
        outcomes = await self._pin(nodes, roots, added)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            await self._pin(nodes, record.roots, set())
            await self.state.end_rollout(in_flight)
            names = ", ".join(o.node.name for o in failed)
            raise NodesNotUpdated(
                f"the update was aborted before staging: {len(failed)} of {len(nodes)} nodes "
                f"could not trust the new root ({names}); no node changed",
                step="trust",
                nodes=[o.as_json() for o in outcomes],
            )
        if self.on_pinned is not None:
            self.on_pinned(roots)
        await seam("after_trust", "")
        staging = replace(in_flight, phase="staging")
        await self.state.add_event(
            TrustEvent(self.clock(), in_flight.actor, "trust", sorted(added),
                       [o.summary() for o in outcomes])
        )  # fmt: skip
        try:
            revision = await self.state.commit_trusted(
                roots, record.revision, staging, in_flight.revision
            )
        except StoreConflict as exc:
            raise UpdateInProgress(
                f"the trusted roots changed during this update ({exc.description}); retry"
            ) from exc
        return replace(staging, revision=revision)

    async def restore(self, nodes: Sequence[NodeRecord]) -> None:
        """After a rollout stopped in phase a: pin the recorded set on every node again.
        A node that does not answer is brought to it by the reconciler."""
        await self._pin(nodes, (await self.state.trust()).roots, set())

    # --- phase c ----------------------------------------------------------------------

    async def _settled(self, nodes: Sequence[NodeRecord], desired: Sequence[CertRecord]) -> bool:
        """Every node proved the desired generation of every name peers present."""
        proofs = await self.state.applied_by_node()
        return all(
            proves(proofs.get(node.node_id, {}).get(record.name), record.generation)
            for node in nodes
            for record in desired
        )

    async def retirable(self, certificates: Sequence[CertRecord] | None = None) -> bool:
        """Whether some pinned root is one no desired certificate chains to any more: what
        :meth:`retire` would unpin once every node proved the desired generations. Reads only.
        ``certificates``: the desired ones, when the caller has read them."""
        record, fingerprints = await self.recorded()
        if not fingerprints:
            return False
        every = await self.state.certificates() if certificates is None else certificates
        chains = [r.certificate for r in every if r.name in PEER_TRUSTED]
        return bool(roots_to_retire(self._parsed(record), chains, self.anchors))

    async def retire(
        self,
        nodes: Sequence[NodeRecord],
        certificates: Sequence[CertRecord] | None = None,
        actor: str = "reconciler",
    ) -> list[str]:
        """Phase c: unpin every root no desired certificate chains to, once every node has
        proved the desired generations (otherwise nothing: a lagging node may still present
        a certificate from an old root). Records the smaller set, then pins it everywhere.
        ``certificates``: the desired ones, when the caller has read them. Returns the
        fingerprints retired."""
        record, fingerprints = await self.recorded()
        if not fingerprints:
            return []
        every = await self.state.certificates() if certificates is None else certificates
        desired = [r for r in every if r.name in PEER_TRUSTED]
        pinned = self._parsed(record)
        retiring = roots_to_retire(pinned, [r.certificate for r in desired], self.anchors)
        if not retiring or not await self._settled(nodes, desired):
            return []
        kept = [_pem(pinned[f]) for f in sorted(pinned) if f not in retiring]
        await self.state.put_trust(kept, record.revision)
        outcomes = await self._pin(nodes, kept, set())
        await self.state.add_event(
            TrustEvent(self.clock(), actor, "retire", sorted(retiring),
                       [o.summary() for o in outcomes])
        )  # fmt: skip
        lagging = [o.node.name for o in outcomes if not o.ok]
        log.info(
            "trust: retired %s (nothing chains to it any more)%s",
            ", ".join(f[:16] for f in sorted(retiring)),
            f"; the reconciler goes on with {', '.join(lagging)}" if lagging else "",
        )
        return sorted(retiring)

    # --- keeping nodes as recorded ------------------------------------------------------

    async def holds_recorded(self, status: StatusAnswer) -> bool:
        """Whether a node that answered ``status`` pins the recorded set (no call to it)."""
        if status.pinned is None:
            return True  # an agent without trust bundles
        _record, fingerprints = await self.recorded()
        return set(status.pinned) == fingerprints

    async def sync(self, node: NodeRecord, status: StatusAnswer) -> bool:
        """Pin the recorded set on ``node`` when its status shows another one (it was down
        during a phase, or joined since). True when the node holds the recorded set."""
        if status.pinned is None:
            return True  # an agent without trust bundles
        record, fingerprints = await self.recorded()
        if set(status.pinned) == fingerprints:
            return True
        roots = record.roots
        (outcome,) = await self._pin([node], roots, set())
        if outcome.ok:
            log.info("trust: %s now pins the recorded %d root(s)", node.name, len(roots))
        return outcome.ok

    async def _pin(
        self, nodes: Sequence[NodeRecord], roots: Sequence[str], added: set[str]
    ) -> list[NodeOutcome]:
        """Pin ``roots`` on ``nodes`` in parallel, except when roots are added on nodes that run
        an etcd member (or never said they do not): those one after the other, after the
        others, because an etcd member loads a new root only by restarting (agent/etcd.py),
        and the store keeps its quorum only if one member restarts at a time. (At 1,000 nodes
        one at a time took 51 s; docs/benchmarks.md.)"""
        if not added:
            return list(await asyncio.gather(*(self._pin_node(n, roots, added) for n in nodes)))
        free = [n for n in nodes if self._etcd_member.get(n.node_id) is False]
        outcomes = dict(
            zip(
                (n.node_id for n in free),
                await asyncio.gather(*(self._pin_node(n, roots, added) for n in free)),
                strict=True,
            )
        )
        for node in nodes:
            if node.node_id not in outcomes:
                outcomes[node.node_id] = await self._pin_node(node, roots, added)
        return [outcomes[n.node_id] for n in nodes]

    async def _pin_node(
        self, node: NodeRecord, roots: Sequence[str], added: set[str]
    ) -> NodeOutcome:
        client = await self.pool.client(node)
        try:
            answer = await client.trust(roots)
        except AgentUnavailable as exc:
            return NodeOutcome(node, ok=False, step="trust", error=exc.description)
        error = _unproven(answer, added)
        return NodeOutcome(node, ok=error is None, step="trust", error=error)


def _unproven(answer: TrustAnswer | None, added: set[str]) -> str | None:
    """Why ``answer`` does not prove that every root in ``added`` is trusted, or None. An
    agent without trust bundles (None: it does not know the call) has nothing to prove."""
    if answer is None:
        return None
    if missing := added - set(answer.pinned):
        return f"the node did not pin {', '.join(f[:16] for f in sorted(missing))}"
    for service, bundle in sorted(answer.bundles.items()):
        if missing := added - set(bundle):
            return f"{service}'s trust bundle lacks {', '.join(f[:16] for f in sorted(missing))}"
    return None
