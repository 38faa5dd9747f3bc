"""Which roots the redis trust bundles of the cluster must hold (DESIGN §13 "Trust phases").

A redis replica verifies its primary's ``proxy``; a primary verifies its replicas'
``data_internode_encryption``; a source outside the cluster may verify ``syncer``. Their
roots are what the bundles must trust. The control plane keeps that set in the store
(``trust/roots``, :class:`~clustercert.control.state.TrustRecord`) and pins it on every agent:

- a root is added (phase *a*) before any certificate chaining to it is staged, and proven on
  every node before the rollout goes on;
- a root is retired (phase *c*) only when no desired certificate chains to it and every node
  has proved the desired generations (so no node still presents an older one).

The internal CA is in every bundle anyway (agents add it), so it is never pinned.
This module is pure: roots of chains, and what to add or retire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography import x509

from clustercert import pki
from clustercert.validation import TrustStore

__all__ = ["PEER_TRUSTED", "chain_root", "roots_to_add", "roots_to_retire"]

# The names whose certificates a redis peer presents on a replication link (DESIGN §3).
PEER_TRUSTED = frozenset({"proxy", "data_internode_encryption", "syncer"})

_MAX_DEPTH = 8


def chain_root(chain_pem: str, anchors: TrustStore) -> x509.Certificate | None:
    """The self-signed root a validated chain ends in: its last certificate when that is
    self-signed, otherwise the anchor (found by name and signature) that issued it. None when
    no self-signed root is known (an anchor that is itself an intermediate)."""
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
    internal_ca: x509.Certificate,
) -> dict[str, x509.Certificate]:
    """The roots of ``chains`` (certificates about to be staged) that are neither pinned nor
    the internal CA, by SHA-256 fingerprint."""
    roots = _by_fingerprint(r for c in chains if (r := chain_root(c, anchors)) is not None)
    skip = {*pinned, pki.fingerprint_sha256(internal_ca)}
    return {f: r for f, r in roots.items() if f not in skip}


def roots_to_retire(
    pinned: Mapping[str, x509.Certificate], desired_chains: Iterable[str], anchors: TrustStore
) -> set[str]:
    """The pinned roots no desired certificate chains to any more. Call it only when every
    node has proved the desired generations: a lagging node may still present an old one."""
    used = _by_fingerprint(r for c in desired_chains if (r := chain_root(c, anchors)) is not None)
    return {f for f in pinned if f not in used}
