"""What the console's pages show, read from the control plane's state: plain values for the
templates, never a private key (the records' ``key`` field is not copied anywhere here)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from clustercert import pki
from clustercert.clock import parse_iso
from clustercert.control.state import AppliedRecord, CertRecord, ClusterState, NodeRecord, proves
from clustercert.names import NAMES, CertificateName

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "Badge",
    "CertificateDetail",
    "CertificateRow",
    "ChainEntry",
    "NodeProof",
    "NodeRow",
    "certificate_detail",
    "certificate_rows",
    "node_rows",
]

_DIGITS = re.compile(r"(\d+)")
EXPIRY_WARNING_DAYS = 30
"""Expiring within this many days: shown in the warning colour (validation warns likewise)."""


@dataclass(frozen=True)
class Badge:
    """One node's state for one certificate: ``in-sync`` (proved the desired generation),
    ``lagging`` (proved an older one, or nothing yet) or ``failed`` (its last proof failed)."""

    node: str
    state: str
    generation: int | None

    @property
    def title(self) -> str:
        proved = f"generation {self.generation}" if self.generation is not None else "nothing"
        return f"{self.node}: {self.state} (proved {proved})"


def _badge(node: NodeRecord, applied: AppliedRecord | None, desired: int) -> Badge:
    if proves(applied, desired):
        return Badge(node.name, "in-sync", desired)
    if applied is None:
        return Badge(node.name, "lagging", None)
    return Badge(node.name, "lagging" if applied.ok else "failed", applied.generation)


@dataclass(frozen=True)
class CertificateRow:
    name: str
    secures: str
    is_set: bool
    has_key: bool
    subject: str = ""
    issuer: str = ""
    sans: Sequence[str] = ()
    not_after: str = ""
    days_left: int | None = None
    source: str = ""
    generation: int | None = None
    fingerprint: str = ""
    badges: Sequence[Badge] = ()

    @property
    def expiring(self) -> bool:
        return self.days_left is not None and self.days_left < EXPIRY_WARNING_DAYS

    @property
    def in_sync(self) -> int:
        return sum(b.state == "in-sync" for b in self.badges)


def _leaf(record: CertRecord) -> x509.Certificate:
    return x509.load_pem_x509_certificates(record.certificate.encode())[0]


def _row(
    row: CertificateName,
    record: CertRecord | None,
    nodes: Sequence[NodeRecord],
    applied: dict[int, dict[str, AppliedRecord]],
    now: dt.datetime,
) -> CertificateRow:
    if record is None:
        return CertificateRow(row.name, row.secures, False, row.has_key)
    leaf = _leaf(record)
    return CertificateRow(
        row.name,
        row.secures,
        True,
        row.has_key,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        sans=pki.subject_alt_names(leaf),
        not_after=record.not_after,
        days_left=(parse_iso(record.not_after) - now).days,
        source=record.source,
        generation=record.generation,
        fingerprint=record.fingerprint,
        badges=[_badge(n, applied[n.node_id].get(row.name), record.generation) for n in nodes],
    )


async def _nodes_and_proofs(
    state: ClusterState,
) -> tuple[list[NodeRecord], dict[int, dict[str, AppliedRecord]]]:
    """Every node in name order, and what each last proved (every node has an entry)."""
    nodes = _by_name(await state.nodes())
    proofs = await state.applied_by_node()
    return nodes, {n.node_id: proofs.get(n.node_id, {}) for n in nodes}


def _by_name(nodes: Sequence[NodeRecord]) -> list[NodeRecord]:
    """Nodes in natural name order (node-2 before node-10): badges are read by name."""
    return sorted(
        nodes, key=lambda n: [int(p) if p.isdigit() else p for p in _DIGITS.split(n.name)]
    )


async def certificate_rows(state: ClusterState, now: dt.datetime) -> list[CertificateRow]:
    """One row per certificate name (DESIGN §3 order), set or not."""
    records = {r.name: r for r in await state.certificates()}
    nodes, applied = await _nodes_and_proofs(state)
    return [_row(row, records.get(row.name), nodes, applied, now) for row in NAMES.values()]


@dataclass(frozen=True)
class ChainEntry:
    subject: str
    issuer: str
    not_before: str
    not_after: str
    fingerprint: str
    is_ca: bool


def _chain(record: CertRecord) -> list[ChainEntry]:
    entries = []
    for cert in x509.load_pem_x509_certificates(record.certificate.encode()):
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        entries.append(
            ChainEntry(
                cert.subject.rfc4514_string(),
                cert.issuer.rfc4514_string(),
                cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC"),
                cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
                pki.fingerprint_sha256(cert),
                is_ca,
            )
        )
    return entries


@dataclass(frozen=True)
class NodeProof:
    """What one node last proved for a certificate: per service, the fingerprint a handshake
    saw, and when."""

    badge: Badge
    fingerprint: str | None
    verified_at: str | None
    services: Sequence[dict[str, Any]] = field(default_factory=tuple)


@dataclass(frozen=True)
class CertificateDetail:
    row: CertificateRow
    updated_at: str
    updated_by: str
    chain: Sequence[ChainEntry]
    nodes: Sequence[NodeProof]
    events: Sequence[dict[str, Any]]


async def certificate_detail(
    state: ClusterState, name: str, now: dt.datetime, *, events: int = 50
) -> CertificateDetail:
    """The details page of ``name`` (a name of :data:`NAMES`): chain, per-node proof, and the
    ``events`` newest history entries of that name."""
    record = await state.certificate(name)
    nodes, applied = await _nodes_and_proofs(state)
    row = _row(NAMES[name], record, nodes, applied, now)
    history = [e for e in await state.events() if e.get("name") == name][:events]
    if record is None:
        return CertificateDetail(row, "", "", (), (), history)
    proofs = []
    for node, badge in zip(nodes, row.badges, strict=True):
        entry = applied[node.node_id].get(name)
        proofs.append(
            NodeProof(
                badge,
                entry.fingerprint if entry else None,
                entry.at if entry else None,
                [
                    {
                        "service": s.get("service", ""),
                        "served_fingerprint": s.get("served_fingerprint"),
                        "ok": s.get("ok"),
                        "error": s.get("error"),
                    }
                    for s in (entry.services if entry else [])
                ],
            )
        )
    return CertificateDetail(
        row, record.updated_at, record.updated_by, _chain(record), proofs, history
    )


@dataclass(frozen=True)
class NodeRow:
    node: NodeRecord
    badges: Sequence[tuple[str, Badge]]  # (certificate name, badge), every set name

    @property
    def in_sync(self) -> bool:
        return all(b.state == "in-sync" for _, b in self.badges)


async def node_rows(state: ClusterState) -> list[NodeRow]:
    """Every node with its state for every set certificate (the logic of ``GET /v1/nodes``'s
    ``in_sync``: each desired generation proved, ok)."""
    desired = {r.name: r.generation for r in await state.certificates()}
    nodes, applied = await _nodes_and_proofs(state)
    return [
        NodeRow(
            node,
            [
                (name, _badge(node, applied[node.node_id].get(name), g))
                for name, g in desired.items()
            ],
        )
        for node in nodes
    ]
