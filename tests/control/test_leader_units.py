"""The leader election (src/clustercert/control/leader.py) without processes: two control
planes' :class:`Leadership` over one SQLite file whose lock clock is a fake, cycles driven by
hand. The real-process suite (test_leader.py) runs it on a 3-member etcd."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from store_fixtures import FakeClock

from clustercert.control.health import NodeHealth
from clustercert.control.leader import LEADER_LOCK, Leadership
from clustercert.control.outage import StoreOutage
from clustercert.control.state import ClusterState
from clustercert.sealing import KeySealer
from clustercert.store import SqliteStore

TTL = 0.09  # the fake clock expires the leases; the loop's own clock only the step-down


def _plane(path: Path, clock: FakeClock, name: str, started: list[str]) -> Leadership:
    state = ClusterState(SqliteStore(path, clock=clock), KeySealer(os.urandom(32)))

    async def work() -> None:
        started.append(name)
        await asyncio.Event().wait()

    return Leadership(
        state,
        name=name,
        api_url=f"https://{name}",
        advertise=(name.split(":")[0],),
        health=NodeHealth(),
        outage=StoreOutage(),
        work=[work],
        ttl=TTL,
    )


def test_one_leads_the_other_follows_and_takes_over_when_its_lease_runs_out(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    started: list[str] = []
    a = _plane(tmp_path / "store.db", clock, "cp-a:9443", started)
    b = _plane(tmp_path / "store.db", clock, "cp-b:9443", started)

    async def scenario() -> None:
        await a.cycle()
        await b.cycle()
        await asyncio.sleep(0)
        assert (a.leading, b.leading, started) == (True, False, ["cp-a:9443"])
        assert await a.state.lock_holder(LEADER_LOCK) == a.owner

        # The leader publishes what it knows of the nodes; the follower shows the same.
        a.health.answered(1)
        a.health.failed(2, "cp-a: connection refused")
        await a.cycle()
        await b.cycle()
        assert b.health.of(1).reachable and b.health.of(1).last_seen == a.health.of(1).last_seen
        assert not b.health.of(2).reachable and b.health.of(2).error == "cp-a: connection refused"
        await a.cycle()  # nothing changed: nothing written
        a.health.answered(2)  # a later change is published too
        await a.cycle()
        await b.cycle()
        assert b.health.of(2).reachable

        listed = {p["name"]: p for p in await b.control_planes()}
        assert listed.keys() == {"cp-a:9443", "cp-b:9443"}
        assert listed["cp-a:9443"]["leader"] and not listed["cp-b:9443"]["leader"]
        assert listed["cp-b:9443"]["this"] and not listed["cp-a:9443"]["this"]
        assert listed["cp-a:9443"]["advertise"] == ["cp-a"]

        # cp-a stops renewing (it hangs, or died on another host): its lease runs out.
        clock.advance(1)
        await b.cycle()
        await asyncio.sleep(0)
        assert b.leading and started == ["cp-a:9443", "cp-b:9443"]
        # cp-a wakes up: its lease is gone, so it steps down and stops its work.
        work = list(a._tasks)
        await a.cycle()
        assert not a.leading and all(t.cancelled() for t in work)
        await a.cycle()
        assert not a.leading  # b renews in time: a stays a follower

        # A leader that cannot reach the store for 2/3 of its lease steps down by itself.
        b.state.store.close()
        await asyncio.sleep(TTL)
        await b.cycle()
        assert not b.leading
        a.state.store.close()

    asyncio.run(scenario())


def test_a_leader_that_stops_releases_the_key_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    a = _plane(tmp_path / "store.db", clock, "cp-a:9443", [])
    b = _plane(tmp_path / "store.db", clock, "cp-b:9443", [])

    async def scenario() -> None:
        running = asyncio.create_task(a.run_forever())
        for _ in range(100):
            if a.leading:
                break
            await asyncio.sleep(0.01)
        assert a.leading
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await b.cycle()  # no time passed: the key was released, not expired
        assert b.leading
        await b._step_down("the test ends")
        for plane in (a, b):
            plane.state.store.close()

    asyncio.run(scenario())
