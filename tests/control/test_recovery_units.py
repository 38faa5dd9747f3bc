"""The pieces crash safety rests on, without a cluster: the rollout record, the reconciler
retrying a node that comes back, the test-only fault seam, and the node's files (a pair that
does not load never lands; crash leftovers are swept; readers never see a half-written pair).
The cluster lock's own tests are in tests/control/test_lock.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from asyncio import run
from collections.abc import Sequence
from pathlib import Path

import pytest
from certfactory import CA

from clustercert.certfiles import CertificateFiles, GenerationPaths
from clustercert.control.agents import AgentPool
from clustercert.control.audit import CertificateEvent
from clustercert.control.faults import FaultPlan
from clustercert.control.lock import lock_owner
from clustercert.control.reconcile import Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.state import AppliedRecord, CertRecord, ClusterState, RolloutRecord
from clustercert.demo import free_port
from clustercert.errors import ConfigError, StoreConflict
from clustercert.sealing import KeySealer
from clustercert.store import Entry, SqliteStore

# --- the rollout record ---------------------------------------------------------------------------


def _state(tmp_path: Path) -> ClusterState:
    return ClusterState(SqliteStore(tmp_path / "store.db"), KeySealer(os.urandom(32)))


def _rollout(generation: int) -> RolloutRecord:
    return RolloutRecord(
        rollout_id="r1",
        phase="staging",
        generations={"proxy": generation},
        fingerprints={"proxy": "ab" * 32},
        previous={"proxy": None},
        actor="admin@cluster.local",
        owner=lock_owner("update"),
        started_at="2025-01-01T00:00:00Z",
    )


def test_one_rollout_in_flight_and_generation_numbers_are_never_reused(tmp_path: Path) -> None:
    state = _state(tmp_path)
    assert run(state.generations_used()) == {}
    first = run(state.begin_rollout(_rollout(5)))
    assert run(state.rollout_in_flight()) == first
    with pytest.raises(StoreConflict):
        run(state.begin_rollout(_rollout(6)))  # the first must be finished before another starts
    run(state.end_rollout(first))  # e.g. aborted
    assert run(state.rollout_in_flight()) is None
    assert run(state.generations_used()) == {"proxy": 5}
    run(state.end_rollout(run(state.begin_rollout(_rollout(3)))))  # never lowers the mark
    assert run(state.generations_used()) == {"proxy": 5}
    state.store.close()


def test_the_end_of_a_rollout_is_one_commit_or_nothing(tmp_path: Path) -> None:
    """Proofs, the audit events and the end of the record land at one revision; when the
    record moved meanwhile (another control plane finished it), nothing is written."""
    state = _state(tmp_path)
    state.store.put("meta/cluster", json.dumps({"next_event": 7}))
    at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    proofs = [(n, "proxy", AppliedRecord(5, "ab" * 32, True)) for n in (1, 2, 3)]
    events = [CertificateEvent(at, "admin@cluster.local", "update", name="proxy", generation=5)]
    stale = run(state.begin_rollout(_rollout(5)))
    run(state.end_rollout(stale))
    with pytest.raises(StoreConflict):
        run(state.finish_rollout(proofs, events, stale))
    assert run(state.applied_by_node()) == {}
    assert run(state.events()) == []
    record = run(state.begin_rollout(_rollout(6)))
    run(state.finish_rollout(proofs, events, record))
    assert run(state.rollout_in_flight()) is None
    assert {n: a["proxy"].generation for n, a in run(state.applied_by_node()).items()} == {
        1: 5, 2: 5, 3: 5
    }  # fmt: skip
    assert [(e["id"], e["action"]) for e in run(state.events())] == [(7, "update")]
    written = {e.key: e.revision for e in state.store.list("")}
    revisions = {written[k] for k in written if k.startswith(("applied/", "events/"))}
    assert revisions == {written["meta/cluster"]}
    assert written["meta/applied"] == written["meta/cluster"]  # the proofs' change check too
    state.store.close()


def _cert(name: str) -> CertRecord:
    leaf = CA.new().issue(name)
    return CertRecord(
        name, 1, leaf.full_chain_pem, leaf.key_pem, leaf.fingerprint, "2030-01-01T00:00:00Z",
        "user", "2025-01-01T00:00:00Z", "admin@cluster.local",
    )  # fmt: skip


def test_every_change_to_the_proofs_moves_the_applied_revision(tmp_path: Path) -> None:
    """What the lifecycle loop re-reads the proofs by: each writer of applied/ moves it in the
    same commit, and nothing else does."""
    state = _state(tmp_path)
    state.store.put("meta/cluster", json.dumps({"next_node_id": 1}))
    proof = AppliedRecord(5, "ab" * 32, True)
    seen = [run(state.applied_revision())]
    assert seen == [0]

    def moved() -> bool:
        now = run(state.applied_revision())
        moved, seen[0] = now != seen[0], now
        return moved and now == max(e.revision for e in state.store.list(""))

    node = run(state.add_node("node-1", "https://127.0.0.1:1", dt.datetime.now(dt.UTC)))
    assert not moved()
    run(state.record_applied(node.node_id, "proxy", proof))
    assert moved()
    # 250 proofs: three commits of at most 100 operations, the marker in each.
    run(state.record_applied_many([(n, "syncer", proof) for n in range(100, 350)]))
    assert moved()
    assert len(run(state.applied_by_node())) == 251
    run(state.put_certificate(_cert("syncer")))
    assert not moved()
    syncer = run(state.certificate("syncer"))
    assert syncer is not None
    run(state.delete_certificate(syncer))
    assert moved()
    assert run(state.remove_node(node.node_id)) is not None
    assert moved()
    assert run(state.applied_by_node()) == {}
    state.store.close()


def test_the_proofs_are_listed_again_only_after_they_changed(tmp_path: Path) -> None:
    """applied_by_node lists every proof only when the proofs marker moved; what it returns
    is the caller's own (changing it changes nothing for the next caller)."""
    listings: list[str] = []

    class CountingStore(SqliteStore):
        def list(self, prefix: str) -> list[Entry]:
            listings.append(prefix)
            return super().list(prefix)

    state = ClusterState(CountingStore(tmp_path / "store.db"), KeySealer(os.urandom(32)))
    proof = AppliedRecord(5, "ab" * 32, True)
    run(state.record_applied_many([(n, "proxy", proof) for n in (1, 2)]))
    assert run(state.applied_by_node()) == {1: {"proxy": proof}, 2: {"proxy": proof}}
    mine = run(state.applied_by_node())
    assert listings.count("applied/") == 1
    mine[1].clear()
    mine.pop(2)
    assert run(state.applied_by_node()) == {1: {"proxy": proof}, 2: {"proxy": proof}}
    newer = AppliedRecord(6, "cd" * 32, True)
    run(state.record_applied(2, "proxy", newer))
    assert run(state.applied_by_node()) == {1: {"proxy": proof}, 2: {"proxy": newer}}
    assert listings.count("applied/") == 2
    state.store.delete("meta/applied")  # a store written before the marker: always listed
    run(state.applied_by_node())
    run(state.applied_by_node())
    assert listings.count("applied/") == 4
    state.store.close()


def test_the_membership_revision_moves_with_the_membership_only(tmp_path: Path) -> None:
    """What the reconciler, the SAN keeper and the alert loop re-read the nodes by: every
    node joining, joining again or removed and every control-plane name added moves it; an
    audit event or a user (their counters share meta/cluster) does not."""
    state = _state(tmp_path)
    state.store.put("meta/cluster", json.dumps({"name": "cluster.local"}))
    now = dt.datetime.now(dt.UTC)
    seen = [run(state.membership_revision())]

    def moved() -> bool:
        """Whether the revision moved, checking that a move was to the latest commit's."""
        current = run(state.membership_revision())
        moved, seen[0] = current != seen[0], current
        assert not moved or current == max(e.revision for e in state.store.list(""))
        return moved

    node = run(state.add_node("node-1", "https://127.0.0.1:1", now))
    assert moved() and [n.name for n in run(state.nodes())] == ["node-1"]
    run(state.add_node("node-1", "https://127.0.0.1:2", now))  # joins again
    assert moved()
    assert run(state.add_control_plane_names(["cp.example"])) == ["cp.example"]
    assert moved()
    assert run(state.add_control_plane_names(["cp.example"])) == []  # nothing new
    assert not moved()
    event = CertificateEvent(now, "admin@cluster.local", "update", name="proxy")
    run(state.add_event(event))
    run(state.create_user("a@cluster.local", "A", "admin", "scrypt$1$1$1$AA$AA"))
    assert not moved()
    assert run(state.remove_node(node.node_id)) is not None
    assert moved()
    state.store.close()


def test_the_polls_share_one_recent_read_and_the_rest_read_the_store(tmp_path: Path) -> None:
    """On etcd each read is a round trip, so the loops' change checks (``recent=True``) share
    one read up to ``poll_age`` old; a check without ``recent`` always reads the store."""
    reads: list[list[str]] = []

    class CountingStore(SqliteStore):
        def revisions(self, prefixes: Sequence[str]) -> dict[str, int]:
            reads.append(list(prefixes))
            return super().revisions(prefixes)

    state = ClusterState(CountingStore(tmp_path / "store.db"), KeySealer(os.urandom(32)), 3600)
    first = state.store.put("certs/proxy", "{}")
    assert run(state.revision("proxy", recent=True)) == first
    assert run(state.membership_revision(recent=True)) == 0
    assert run(state.desired_revisions(recent=True)) == (("certs/proxy", first),)
    assert len(reads) == 1  # one store read for three checks
    second = state.store.put("meta/membership", "{}")
    assert run(state.membership_revision(recent=True)) == 0  # up to poll_age old
    assert run(state.membership_revision()) == second  # not recent: the store now
    assert run(state.membership_revision(recent=True)) == second  # and shared from then on
    assert len(reads) == 2
    state.poll_age = 0.0  # SQLite's default: every check reads
    assert run(state.applied_revision(recent=True)) == 0
    assert len(reads) == 3

    async def together() -> list[int]:  # checks made while a read is under way join it
        return await asyncio.gather(*(state.membership_revision(recent=True) for _ in range(5)))

    assert run(together()) == [second] * 5
    assert len(reads) == 4
    state.store.close()


# --- the reconciler and a node that comes back ----------------------------------------------------


def test_a_node_that_listens_again_is_retried_before_its_backoff_ends(tmp_path: Path) -> None:
    """The clock stands still, so backoff alone would never retry the node; only seeing its
    agent listen again does. Counted by the connections the returning "agent" receives."""
    state = _state(tmp_path)
    state.store.put("meta/cluster", json.dumps({"name": "cluster.local"}))
    port = free_port()
    run(state.add_node("node-1", f"https://127.0.0.1:{port}", dt.datetime.now(dt.UTC)))
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    async def scenario() -> None:
        pool = AgentPool(ssl.create_default_context(), timeout=2.0)
        reconciler = Reconciler(Coordinator(state, pool), interval=5.0, clock=lambda: 100.0)
        assert await reconciler.run_once() is False  # nothing listens: it fails, backs off
        assert await reconciler.run_once() is False  # in backoff: only a probe, still gone
        assert connections == []
        server = await asyncio.start_server(accept, "127.0.0.1", port)
        try:
            await reconciler.run_once()  # the probe sees it, so it is retried at once
            assert len(connections) >= 2, connections  # the probe, then the status call
            seen = len(connections)
            await reconciler.run_once()  # listening but failing: backoff again, one probe
            assert len(connections) == seen + 1
        finally:
            server.close()
            await server.wait_closed()
            await pool.aclose()

    asyncio.run(scenario())
    state.store.close()


# --- the fault seam -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "step", "pause"),
    [("after_decision", "after_decision", False), ("pause:during_stage", "during_stage", True)],
)
def test_fault_plan_parses(tmp_path: Path, spec: str, step: str, pause: bool) -> None:
    plan = FaultPlan.parse(spec, tmp_path)
    assert (plan.step, plan.pause) == (step, pause)


@pytest.mark.parametrize("spec", ["after_lunch", "stop:after_decision", "pause:"])
def test_fault_plan_rejects_unknown_steps(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ConfigError, match="CLUSTERCERT_FAULT"):
        FaultPlan.parse(spec, tmp_path)


def test_fault_pause_waits_until_its_marker_is_deleted(tmp_path: Path) -> None:
    plan = FaultPlan.parse("pause:after_decision", tmp_path)
    marker = tmp_path / "fault-paused-after_decision"

    async def scenario() -> None:
        await plan.reached("during_commit")  # another step: no pause
        assert not marker.exists()
        paused = asyncio.create_task(plan.reached("after_decision"))
        for _ in range(200):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.exists() and not paused.done()
        marker.unlink()
        await asyncio.wait_for(paused, 5)

    asyncio.run(scenario())


def test_fault_kill_kills_the_process(tmp_path: Path) -> None:
    code = (
        "import asyncio, pathlib\n"
        "from clustercert.control.faults import FaultPlan\n"
        "plan = FaultPlan.parse('during_commit', pathlib.Path('.'))\n"
        "asyncio.run(plan.reached('after_decision'))\n"
        "print('passed after_decision', flush=True)\n"
        "asyncio.run(plan.reached('during_commit'))\n"
        "print('survived')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == -9
    assert done.stdout == "passed after_decision\n"


# --- node files -----------------------------------------------------------------------------------


def _loads(paths: GenerationPaths) -> None:
    assert paths.key is not None
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths.cert, paths.key)


def test_a_pair_that_fails_its_check_never_lands(tmp_path: Path) -> None:
    files = CertificateFiles(tmp_path)
    one, other = CA.new().issue("a.example"), CA.new().issue("b.example")
    with pytest.raises(ssl.SSLError):
        files.stage("proxy", 1, one.cert_pem, other.key_pem, check=_loads)
    assert files.generations("proxy") == []
    assert list((tmp_path / "certs" / "proxy").iterdir()) == []
    paths = files.stage("proxy", 1, one.cert_pem, one.key_pem, check=_loads)
    assert paths.cert.read_text() == one.cert_pem


def test_a_torn_generation_never_answered_is_replaced_by_its_next_stage(tmp_path: Path) -> None:
    """What a power cut before a stage's fsync may leave (the rename on disk, not the data):
    the control plane was never told it was staged, and a stage of it writes it whole."""
    files = CertificateFiles(tmp_path)
    leaf = CA.new().issue("a.example")
    torn = tmp_path / "certs" / "proxy" / "4"
    torn.mkdir(parents=True)
    (torn / "cert.pem").write_text("")
    paths = files.stage("proxy", 4, leaf.cert_pem, leaf.key_pem, check=_loads)
    assert paths.cert.read_text() == leaf.cert_pem
    assert paths.key is not None and paths.key.read_text() == leaf.key_pem
    assert files.stage("proxy", 4, leaf.cert_pem, leaf.key_pem) == paths  # idempotent


def test_crash_leftovers_are_swept_when_the_files_are_opened(tmp_path: Path) -> None:
    files = CertificateFiles(tmp_path)
    leaf = CA.new().issue("a.example")
    files.stage("proxy", 1, leaf.cert_pem, leaf.key_pem)
    files.activate("proxy", 1)
    name_dir = tmp_path / "certs" / "proxy"
    # What a kill -9 can leave: a staging directory, a directory being deleted, a temp file,
    # a whole name being removed.
    (name_dir / ".2.staging").mkdir()
    (name_dir / ".2.staging" / "cert.pem").write_text("half")
    (name_dir / ".trash-0-abcd").mkdir()
    (name_dir / ".current.1234.tmp").write_text("2")
    (tmp_path / "certs" / ".trash-ldap_client-abcd").mkdir()
    reopened = CertificateFiles(tmp_path)
    assert sorted(p.name for p in name_dir.iterdir()) == ["1", "current"]
    assert reopened.names() == ["proxy"]
    assert reopened.current("proxy") == 1


def test_discard_and_remove_leave_nothing_behind(tmp_path: Path) -> None:
    files = CertificateFiles(tmp_path)
    for generation in (1, 2):
        leaf = CA.new().issue("a.example")
        files.stage("proxy", generation, leaf.cert_pem, leaf.key_pem)
    files.activate("proxy", 1)
    files.discard("proxy", 2)
    files.discard("proxy", 1)  # current: kept
    assert sorted(p.name for p in (tmp_path / "certs" / "proxy").iterdir()) == ["1", "current"]
    files.remove("proxy")
    assert list((tmp_path / "certs").iterdir()) == []


def test_readers_never_see_a_certificate_and_key_that_do_not_match(tmp_path: Path) -> None:
    """A service reading the current pair while generations are staged, activated and pruned
    sees a matching pair or (pruned under it) no file, never a mismatch or half a file."""
    files = CertificateFiles(tmp_path)
    ca = CA.new()
    leaves = [ca.issue(f"g{i}.example") for i in range(40)]
    files.stage("proxy", 1, leaves[0].cert_pem, leaves[0].key_pem)
    files.activate("proxy", 1)
    stop = threading.Event()
    seen = {"ok": 0, "gone": 0, "mismatch": 0}

    def read() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            generation = files.current("proxy")
            paths = files.paths("proxy", generation) if generation else None
            if paths is None or paths.key is None:
                seen["gone"] += 1
                continue
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths.cert, paths.key)
            except FileNotFoundError:
                seen["gone"] += 1
            except ssl.SSLError:
                seen["mismatch"] += 1
            else:
                seen["ok"] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for generation, leaf in enumerate(leaves[1:], start=2):
            files.stage("proxy", generation, leaf.cert_pem, leaf.key_pem)
            files.activate("proxy", generation)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert seen["mismatch"] == 0, seen
    assert seen["ok"] > 0, seen
    assert files.generations("proxy") == [len(leaves) - 1, len(leaves)]
