"""Audit events (DESIGN §8): who changed what, when, and what each node did.

Every writer builds one of these typed events and hands it to
:meth:`ClusterState.add_event <clustercert.control.state.ClusterState.add_event>`; the JSON
shape that ``GET /v1/cluster/certificates/events`` returns is defined here, once.
No private key material ever goes into an event: the types have no place for it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clustercert.clock import iso

__all__ = [
    "AuditEvent",
    "CaEvent",
    "CertificateEvent",
    "NodeEvent",
    "SettingsEvent",
    "TrustEvent",
    "UserEvent",
]


@dataclass(frozen=True)
class AuditEvent:
    """What every event has: when (UTC), who (an e-mail, ``node:NAME``, ``init`` or
    ``rotation-job``), what."""

    at: dt.datetime
    who: str
    action: str

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "who": self.who, "action": self.action}


@dataclass(frozen=True)
class CertificateEvent(AuditEvent):
    """A certificate changed (``update``, ``retry``, ``delete``) or a rollout was aborted
    (``abort``). ``nodes``: each node's short outcome. ``rollout_id`` is set when the event was
    written by crash recovery (``recovered``) for the rollout it finished."""

    name: str = ""
    generation: int = 0
    old_fingerprint: str | None = None
    new_fingerprint: str | None = None
    nodes: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    rollout_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = {
            **super().to_json(),
            "name": self.name,
            "generation": self.generation,
            "old_fingerprint": self.old_fingerprint,
            "new_fingerprint": self.new_fingerprint,
        }
        if self.rollout_id is not None:
            body |= {"recovered": True, "rollout_id": self.rollout_id}
        return body | {"nodes": [dict(n) for n in self.nodes]}


@dataclass(frozen=True)
class TrustEvent(AuditEvent):
    """Roots the redis trust bundles must hold changed: pinned on every node before a rollout
    staged a certificate chaining to them (``trust``), or unpinned once nothing chains to them
    (``retire``). ``roots``: their SHA-256 fingerprints; ``nodes``: each node's outcome."""

    roots: Sequence[str] = field(default_factory=tuple)
    nodes: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "roots": list(self.roots),
                "nodes": [dict(n) for n in self.nodes]}  # fmt: skip


@dataclass(frozen=True)
class CaEvent(AuditEvent):
    """The internal CA rotation started (``start``) or entered a phase (``reissuing``,
    ``switching``, ``retiring``, ``done``); ``old`` and ``new``: the CAs' fingerprints."""

    old: str = ""
    new: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "name": "internal_ca", "old_fingerprint": self.old,
                "new_fingerprint": self.new}  # fmt: skip


@dataclass(frozen=True)
class NodeEvent(AuditEvent):
    """A node joined (``join``) or was removed by an operator (``remove``)."""

    node_id: int = 0
    agent_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "node_id": self.node_id, "agent_url": self.agent_url}


@dataclass(frozen=True)
class UserEvent(AuditEvent):
    """A user was created, changed or deleted."""

    uid: int = 0
    email: str = ""
    role: str = ""
    auth_method: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "uid": self.uid, "email": self.email, "role": self.role,
                "auth_method": self.auth_method}  # fmt: skip


@dataclass(frozen=True)
class SettingsEvent(AuditEvent):
    """The cluster settings changed (``settings``): each changed key's dotted path with its old
    and new value (a webhook URL is shown without its query string, which may hold a secret)."""

    changes: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "changes": {k: {"old": old, "new": new} for k, (old, new) in self.changes.items()},
        }
