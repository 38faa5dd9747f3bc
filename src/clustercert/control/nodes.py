"""The nodes as the API shows and changes them: ``GET /v1/nodes``, ``DELETE /v1/nodes/{uid}``.

The routes are thin; what a node's answer contains, and what removing one does, is here.
"""

from __future__ import annotations

from typing import Any

from clustercert.control.audit import NodeEvent
from clustercert.control.lock import cluster_lock
from clustercert.control.plane import ControlPlane
from clustercert.control.state import NodeRecord
from clustercert.errors import NotFound

__all__ = ["desired_generations", "node_body", "remove_node"]


def desired_generations(cp: ControlPlane) -> dict[str, int]:
    return {r.name: r.generation for r in cp.state.certificates()}


def node_body(cp: ControlPlane, node: NodeRecord, desired: dict[str, int]) -> dict[str, Any]:
    """One node: where it is, whether it answers now, and what it proved. ``in_sync`` is true
    only for a node that is reachable now and proved every desired generation: nothing is
    claimed about a node nobody can see."""
    applied = cp.state.applied(node.node_id)
    health = cp.reconciler.health.of(node.node_id)
    proved = all(
        (a := applied.get(name)) is not None and a.ok and a.generation == generation
        for name, generation in desired.items()
    )
    return {
        "uid": node.node_id,
        "name": node.name,
        "agent_url": node.agent_url,
        "joined_at": node.joined_at,
        "reachable": health.reachable,
        "last_seen": health.last_seen,
        "in_sync": health.reachable and proved,
        "certificates": {
            name: {"generation": a.generation, "fingerprint": a.fingerprint, "ok": a.ok}
            for name, a in applied.items()
        },
    }


async def remove_node(cp: ControlPlane, node_id: int, actor: str) -> NodeRecord:
    """Remove the node from the cluster: its records leave the store (atomically), nothing
    calls it any more, the removal is audited, and the certificates that named it are
    re-issued in the background. NotFound for an unknown id.

    Under the cluster lock (waiting like an update, then 409 ``update_in_progress``): no
    rollout or reconciler pass is half-way through with the node when it goes."""
    async with cluster_lock(cp.state, cp.coordinator.lock_wait, role="remove"):
        node = cp.state.remove_node(node_id)
        if node is None:
            raise NotFound(f"no node with id {node_id}")
        await cp.reconciler.forget(node_id)
    cp.state.add_event(
        NodeEvent(cp.clock(), actor, "remove", node_id=node.node_id, agent_url=node.agent_url)
    )
    if cp.sankeeper is not None:
        cp.sankeeper.wake()
    return node
