"""What a rollout reports: each node's outcome (the API's ``nodes`` entries) and the live
progress of the rollout in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustercert.control.state import NodeRecord
from clustercert.internode import CommitAnswer

__all__ = ["NodeOutcome", "Progress"]


@dataclass
class NodeOutcome:
    """One node's result in a rollout, as the API reports it. ``results`` are the node's
    commit answers (or, for a node that had already proved them, the same built from what it
    proved); each becomes one entry of ``certificates``."""

    node: NodeRecord
    ok: bool = True
    step: str = "commit"
    error: str | None = None
    results: list[CommitAnswer] | None = None

    def summary(self) -> dict[str, Any]:
        """The short form kept in audit events."""
        return {"node_id": self.node.node_id, "name": self.node.name, "ok": self.ok,
                "error": self.error}  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        results = self.results or []
        served = [s.served_fingerprint for r in results for s in r.services if s.served_fingerprint]
        return {
            "node_id": self.node.node_id,
            "name": self.node.name,
            "ok": self.ok,
            "step": self.step,
            "error": self.error,
            "served_fingerprint": served[0] if len(set(served)) == 1 else served or None,
            "certificates": [r.to_json() for r in results],
        }


@dataclass
class Progress:
    """How far the rollout this control plane is running has come on each node, for
    ``GET /v1/cluster/certificates/rollout`` (and the CLI's live view). In memory only: it
    describes work in flight, not state; the store keeps the decision."""

    names: list[str]
    nodes: dict[
        str, str
    ]  # node name -> waiting | staging | staged | committing | verified | failed
    phase: str = "staging"

    def as_json(self) -> dict[str, Any]:
        return {"in_progress": True, "names": self.names, "phase": self.phase,
                "nodes": dict(self.nodes)}  # fmt: skip
