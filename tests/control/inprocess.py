"""An in-process API for fast edge tests: a real ControlPlane over a temporary SQLite store made
by ``init_cluster``, with **zero nodes**, served through ``httpx.ASGITransport`` (no process,
no socket, no TLS). Rollouts have no node to reach, so nothing stands in for an agent; the
real-process tests (tests/test_*.py, marked cluster) cover the agents and TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from clustercert.clock import utc_now
from clustercert.control.agents import AgentPool
from clustercert.control.app import build_app
from clustercert.control.auth import Authenticator, hash_password
from clustercert.control.directory import init_cluster
from clustercert.control.lifecycle import Lifecycle
from clustercert.control.metrics import Metrics
from clustercert.control.plane import ControlPlane
from clustercert.control.reconcile import Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.state import ClusterState
from clustercert.sealing import KeySealer
from clustercert.store import Store, open_store
from clustercert.validation import TrustStore

__all__ = [
    "ADMIN",
    "MANAGER",
    "VIEWER",
    "InProcess",
    "basic",
    "in_process",
    "run",
    "state_with_nodes",
]

PASSWORD = "correct horse battery staple"
ADMIN = ("admin@cluster.local", PASSWORD)
VIEWER = ("viewer@cluster.local", PASSWORD)
MANAGER = ("manager@cluster.local", PASSWORD)

_T = TypeVar("_T")


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def basic(credentials: tuple[str, str]) -> dict[str, str]:
    """An Authorization header (for requests that must also send odd bodies or headers)."""
    token = base64.b64encode(":".join(credentials).encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class InProcess:
    cp: ControlPlane
    store: Store

    @property
    def state(self) -> ClusterState:
        return self.cp.state

    def snapshot(self) -> dict[str, Any]:
        """What a rejected request must leave as it was: certificates, users, nodes, events."""
        return {
            "certificates": {
                r.name: (r.generation, r.fingerprint) for r in run(self.state.certificates())
            },
            "users": sorted(u.email for u in run(self.state.users())),
            "nodes": run(self.state.nodes()),
            "events": len(run(self.state.events())),
        }

    @contextlib.asynccontextmanager
    async def client(
        self, auth: tuple[str, str] | None = ADMIN
    ) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=build_app(self.cp), client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(
            transport=transport, base_url="https://testserver", auth=auth
        ) as client:
            yield client


@contextlib.contextmanager
def in_process(path: Path) -> Iterator[InProcess]:
    made = init_cluster(
        path, name="cluster.local", admin_email=ADMIN[0], admin_password=PASSWORD, now=utc_now()
    )
    directory = made.directory
    store = directory.open_store()
    try:
        state = directory.state(store)
        for email, role in ((VIEWER[0], "cluster_viewer"), (MANAGER[0], "user_manager")):
            run(state.create_user(email, role, role, hash_password(PASSWORD)))
        ca = directory.ca()
        coordinator = Coordinator(state, AgentPool(ssl.create_default_context(), 2.0))
        metrics = Metrics(state)
        yield InProcess(
            ControlPlane(
                state=state,
                coordinator=coordinator,
                reconciler=Reconciler(coordinator),
                authenticator=Authenticator(state.user),
                trust=TrustStore.system(extra=[ca.cert]),
                ca=ca,
                metrics=metrics,
                lifecycle=Lifecycle(state, coordinator, ca, metrics),
            ),
            store,
        )
    finally:
        store.close()


@contextlib.contextmanager
def state_with_nodes(path: Path, names: tuple[str, ...]) -> Iterator[ClusterState]:
    """A real store (SQLite in ``path``, keys sealed) holding a cluster with the nodes
    ``names`` (agent URLs on loopback ports 9500...; nothing listens: the tests that use it
    put fakes behind the ``Agents`` protocol)."""
    state = ClusterState(open_store(f"sqlite://{path}/store.db"), KeySealer(os.urandom(32)))
    state.store.put("meta/cluster", '{"name": "cluster.local"}', expect_revision=0)
    for index, name in enumerate(names):
        run(state.add_node(name, f"https://127.0.0.1:{9500 + index}", utc_now()))
    try:
        yield state
    finally:
        state.store.close()
