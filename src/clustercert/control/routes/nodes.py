"""``/v1/nodes``: the joined nodes, whether each answers and what each serves, and removing one;
``/v1/internal/join``: a node agent joins with a one-time token and a CSR (authenticated by the
token, not by a user); ``/v1/internal/ca``: the cluster CA, public, for joins that pin it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clustercert import pki
from clustercert.control.answers import (
    CaAnswer,
    JoinAnswer,
    NodeAnswer,
    RemovedNodeAnswer,
    answers,
    request_body,
)
from clustercert.control.audit import NodeEvent
from clustercert.control.health import Reachability
from clustercert.control.http import Plane, StrictModel, Updater, Viewer, parse_model, read_json
from clustercert.control.lock import cluster_lock
from clustercert.control.plane import ControlPlane
from clustercert.control.state import AppliedRecord, NodeRecord, proves
from clustercert.errors import InvalidSchema, NotFound, Unauthorized
from clustercert.jointoken import ca_hash

__all__ = ["JoinBody", "agent_host", "router"]

router = APIRouter()


class JoinBody(StrictModel):
    token: str
    name: str
    agent_url: str
    csr: str


@router.get("/v1/nodes", responses=answers(list[NodeAnswer], 401, 403))
async def nodes(cp: Plane, user: Viewer) -> list[NodeAnswer]:
    desired = await _desired_generations(cp)
    applied = await cp.state.applied_by_node()
    return [
        _node_answer(n, desired, applied.get(n.node_id, {}), cp.reconciler.health.of(n.node_id))
        for n in await cp.state.nodes()
    ]


@router.get("/v1/nodes/{node_id}", responses=answers(NodeAnswer, 400, 401, 403, 404))
async def node(node_id: int, cp: Plane, user: Viewer) -> NodeAnswer:
    record = await cp.state.node(node_id)
    if record is None:
        raise NotFound(f"no node with id {node_id}")
    desired = await _desired_generations(cp)
    health = cp.reconciler.health.of(node_id)
    return _node_answer(record, desired, await cp.state.applied(record.node_id), health)


@router.delete("/v1/nodes/{node_id}", responses=answers(RemovedNodeAnswer, 400, 401, 403, 404))
async def delete_node(node_id: int, cp: Plane, user: Updater) -> RemovedNodeAnswer:
    """Remove the node from the cluster (docs/deploy.md): its records leave the store
    (atomically), nothing calls it any more, the removal is audited, and the certificates that
    named it are re-issued in the background. 404 for an unknown uid.

    Under the cluster lock (waiting like an update, then 409 ``update_in_progress``): no
    rollout or reconciler pass is half-way through with the node when it goes."""
    async with cluster_lock(cp.state, cp.coordinator.lock_wait, role="remove"):
        removed = await cp.state.remove_node(node_id)
        if removed is None:
            raise NotFound(f"no node with id {node_id}")
        await cp.reconciler.forget(node_id)
    await cp.state.add_event(
        NodeEvent(cp.clock(), user.email, "remove", node_id=node_id, agent_url=removed.agent_url)
    )
    if cp.sankeeper is not None:
        cp.sankeeper.wake()
    return RemovedNodeAnswer(
        uid=removed.node_id, name=removed.name, agent_url=removed.agent_url, removed=True
    )


@router.get("/v1/internal/ca", responses=answers(CaAnswer))
async def internal_ca(cp: Plane) -> CaAnswer:
    """The cluster CA certificate (public), for agents that join with a token pinning it
    (docs/decisions.md, "Join without copying files"). Unauthenticated by design: the joining
    agent trusts it only if its key hashes to the token's pin."""
    return CaAnswer(ca_certificate=cp.ca.cert_pem, ca_cert_hash=ca_hash(cp.ca.cert))


@router.post(
    "/v1/internal/join",
    openapi_extra=request_body(JoinBody),
    responses=answers(JoinAnswer, 400, 401, 408, 413, 415),
)
async def join(request: Request, cp: Plane) -> JoinAnswer:
    body = parse_model(JoinBody, await read_json(request))
    now = cp.clock()
    if not await cp.state.consume_join_token(body.token, now):
        raise Unauthorized("the join token is unknown, already used or expired")
    host = agent_host(body.agent_url)
    try:
        certificate = pki.sign_csr(
            cp.ca, body.csr, body.name, sans=(host,), eku={"serverAuth"}, now=now
        )
    except ValueError as exc:
        raise InvalidSchema(f"csr: {exc}") from None
    node = await cp.state.add_node(body.name, body.agent_url, now)
    cp.reconciler.wake(node.node_id)
    if cp.sankeeper is not None:
        cp.sankeeper.wake()  # certificates that name every node follow, after this answer
    await cp.state.add_event(
        NodeEvent(now, f"node:{body.name}", "join", node_id=node.node_id, agent_url=body.agent_url)
    )
    return JoinAnswer(
        node_id=node.node_id,
        certificate=certificate,
        # During an internal CA rotation: the old and the new CA (docs/ca-rotation.md).
        ca_certificate=cp.ca_bundle_pem or cp.ca.cert_pem,
        cluster_name=await cp.state.cluster_name(),
    )


def agent_host(url: str) -> str:
    """The host of an agent URL (``https://host:port``), without IPv6 brackets."""
    return url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


async def _desired_generations(cp: ControlPlane) -> dict[str, int]:
    return {r.name: r.generation for r in await cp.state.certificates()}


def _node_answer(
    node: NodeRecord,
    desired: dict[str, int],
    applied: dict[str, AppliedRecord],
    health: Reachability,
) -> NodeAnswer:
    """A node as the API shows it (``applied``: what it last proved; ``health``: whether it
    answers now). ``in_sync`` only for a node that is reachable now and proved every desired
    generation: nothing is claimed about a node nobody can see."""
    proved = all(proves(applied.get(name), g) for name, g in desired.items())
    return NodeAnswer(
        uid=node.node_id,
        name=node.name,
        agent_url=node.agent_url,
        joined_at=node.joined_at,
        reachable=health.reachable,
        last_seen=health.last_seen,
        in_sync=health.reachable and proved,
        certificates={
            name: {"generation": a.generation, "fingerprint": a.fingerprint, "ok": a.ok}
            for name, a in applied.items()
        },
    )
