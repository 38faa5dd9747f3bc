"""Leader election among the control planes sharing a store (docs/decisions.md, "One leader").

Patroni's pattern (``patroni/ha.py``): a leader key held with a lease. Each control plane runs
one cycle every ``ttl / 3`` seconds while it leads, every second (at most) while it follows:

- every ``ttl / 3`` seconds it records itself under ``control_planes/<name>`` (its API URL,
  advertised names, when it was last seen), which ``GET /v1/cluster/control_planes`` lists;
- the leader renews its lease. If the store says the lease is gone, or the leader has not
  renewed it for ``2 / 3`` of the ttl (the store does not answer), it steps down at once:
  another control plane may already lead;
- a follower tries to take the key (one read while it is held). The key's lease runs out
  ``ttl`` seconds after a leader's last renewal, so a leader that died is replaced within one
  lease and a second (at once when the holder was
  a process of this host that no longer runs, as for the cluster lock: :mod:`.lock`).

The leader runs the background work that acts on nodes or writes shared state (the
reconciler, the SAN keeper, the rotation job and alert recording); every control plane serves
the API and takes the cluster update lock for updates. The leader publishes what it learns of
each node's reachability (``health/nodes``) when it changes; followers load it, so every
control plane answers ``GET /v1/nodes`` the same way. On SQLite (one control plane) the same
loop runs and this process simply always wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from clustercert.clock import iso, parse_iso, utc_now
from clustercert.control.health import NodeHealth
from clustercert.control.lock import holder_is_gone, lock_owner
from clustercert.control.outage import StoreOutage
from clustercert.control.state import ClusterState
from clustercert.errors import StoreError

__all__ = ["LEADER_LOCK", "LEADER_TTL", "ControlPlaneRecord", "Leadership"]

log = logging.getLogger("clustercert.leader")

LEADER_LOCK = "leader"
LEADER_TTL = 10.0

Work = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ControlPlaneRecord:
    """One control plane as it registered itself (``control_planes/<name>``)."""

    name: str  # HOST:PORT of its API, as clients reach it
    api_url: str
    advertise: tuple[str, ...]
    owner: str  # its leader-lock owner string: who holds the leader key is this record
    started_at: str
    last_seen: str

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "advertise": list(self.advertise)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ControlPlaneRecord:
        return cls(
            name=str(raw["name"]),
            api_url=str(raw["api_url"]),
            advertise=tuple(str(a) for a in raw.get("advertise", [])),
            owner=str(raw["owner"]),
            started_at=str(raw["started_at"]),
            last_seen=str(raw["last_seen"]),
        )


class Leadership:
    """This control plane's part in the election; :meth:`run_forever` is its loop.

    ``work``: coroutine functions started as tasks when this control plane becomes the leader
    and cancelled when it steps down. ``on_change(leading)`` is told of every change (the
    metric)."""

    def __init__(
        self,
        state: ClusterState,
        *,
        name: str,
        api_url: str,
        advertise: Sequence[str] = (),
        health: NodeHealth,
        outage: StoreOutage,
        work: Sequence[Work] = (),
        ttl: float = LEADER_TTL,
        on_change: Callable[[bool], None] = lambda _leading: None,
    ) -> None:
        self.state = state
        self.owner = lock_owner("leader")
        self.health = health
        self.outage = outage
        self.work = list(work)
        self.ttl = ttl
        self.on_change = on_change
        started = iso(utc_now())
        self.record = ControlPlaneRecord(
            name, api_url, tuple(advertise), self.owner, started, started
        )
        self.leading = False
        self._renewed = 0.0  # loop time the lease was last renewed (taken before the call)
        self._tasks: list[asyncio.Task[None]] = []
        self._published: dict[str, Any] | None = None
        self._published_changes = -1  # NodeHealth.changes when _published was taken
        self._registered = -self.ttl  # loop time of the last registration

    @property
    def tick(self) -> float:
        return self.ttl / 3 if self.leading else min(1.0, self.ttl / 3)

    async def run_forever(self) -> None:
        """Cycle every ``ttl / 3`` seconds until cancelled; then step down (releasing the key,
        so that another control plane takes over at once on a clean stop)."""
        try:
            while True:
                await self.cycle()
                await asyncio.sleep(self.tick)
        finally:
            if self.leading:
                await self._step_down("this control plane stops")
                with contextlib.suppress(StoreError):
                    await self.state.unlock(LEADER_LOCK, self.owner)

    async def cycle(self) -> None:
        """One cycle (see the module docstring). Never raises a StoreError: a store outage is
        reported to :class:`StoreOutage`, and a leader that cannot renew steps down."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if started - self._registered >= self.ttl / 3:
                await self._register()
                self._registered = started
            if self.leading:
                if await self.state.refresh_lock(LEADER_LOCK, self.owner, self.ttl):
                    self._renewed = started
                    await self._publish_health()
                else:
                    await self._step_down("its lease on the leader key ran out")
            elif await self._take():
                self._renewed = started
                await self._lead()
            else:
                await self._follow_health()
            self.outage.answered()
        except StoreError as exc:
            self.outage.failed(exc, "keeping the control-plane leadership")
            if self.leading and loop.time() - self._renewed >= self.ttl * 2 / 3:
                await self._step_down(
                    f"it could not renew its lease for {loop.time() - self._renewed:.1f} s"
                )

    async def _take(self) -> bool:
        if await self.state.try_lock(LEADER_LOCK, self.owner, self.ttl):
            return True
        holder = await self.state.lock_holder(LEADER_LOCK)
        if holder is not None and holder_is_gone(holder):
            log.warning("the leader %s no longer runs on this host; taking over", holder)
            await self.state.unlock(LEADER_LOCK, holder)  # only if it still holds it: atomic
            return await self.state.try_lock(LEADER_LOCK, self.owner, self.ttl)
        return False

    async def _lead(self) -> None:
        self.leading = True
        log.warning("this control plane (%s) is now the leader", self.record.name)
        self.on_change(True)
        self._tasks = [asyncio.create_task(work(), name=work.__qualname__) for work in self.work]

    async def _step_down(self, why: str) -> None:
        self.leading = False
        log.warning("this control plane (%s) is no longer the leader: %s", self.record.name, why)
        self.on_change(False)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._published, self._published_changes = None, -1

    async def _register(self) -> None:
        self.record = dataclasses.replace(self.record, last_seen=iso(utc_now()))
        await self.state.register_control_plane(self.record.name, self.record.as_json())

    async def _publish_health(self) -> None:
        """Write the nodes' reachability when it changed since the last write (a snapshot is
        taken only when the record changed: at 1,000 nodes it formats 1,000 times)."""
        changes = self.health.changes
        if changes == self._published_changes:
            return
        snapshot = self.health.snapshot()
        if snapshot != self._published:
            await self.state.put_node_health(snapshot)
            self._published = snapshot
        self._published_changes = changes

    async def _follow_health(self) -> None:
        snapshot = await self.state.node_health()
        if snapshot is not None:
            self.health.load(snapshot)

    async def control_planes(self) -> list[dict[str, Any]]:
        """Every registered control plane: name, API URL, advertised names, ``leader``,
        ``last_seen``, and ``alive`` (seen within two leases)."""
        holder = await self.state.lock_holder(LEADER_LOCK)
        now = utc_now()
        answer = []
        for raw in await self.state.control_planes():
            record = ControlPlaneRecord.from_json(raw)
            seen = (now - parse_iso(record.last_seen)).total_seconds()
            answer.append(
                {
                    "name": record.name,
                    "api_url": record.api_url,
                    "advertise": list(record.advertise),
                    "leader": holder == record.owner,
                    "alive": seen <= 2 * self.ttl + 1,  # + the times' 1 s resolution
                    "started_at": record.started_at,
                    "last_seen": record.last_seen,
                    "this": record.owner == self.owner,
                }
            )
        return answer
