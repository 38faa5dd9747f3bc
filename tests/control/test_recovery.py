"""Fault injection with real processes (DESIGN §6, docs/reliability.md).

Every case ends the same way: every node serves one certificate, equal to the store's desired
one, by handshake; GET says every node is in sync; no rollout is left in flight; and on every
node's disk each generation holds a certificate and key that load together, with nothing
staged beyond the desired generation and no half-written leftovers. A case that does not reach
that state within CONVERGE_TIMEOUT (shorter than the lock's 30 s lease, so that a restarted
control plane must take the lock over rather than wait for it) is a split final state.

Each case repeats REPEAT times (CLUSTERCERT_SOAK_REPEAT; `make soak` raises it). When
CLUSTERCERT_RELIABILITY_OUT names a file, the figures of the run are written there as JSON.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import signal
import ssl
import statistics
import subprocess
import time
from asyncio import run
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from certfactory import CA
from clusterkit import (
    accepts,
    api,
    internal_proxy_body,
    marker,
    proxy_body,
    put,
    restart_server,
    served_fingerprint,
    thaw,
    wait_until,
)
from conftest import start_cluster

from clustercert.control.faults import ROLLOUT_STEPS
from clustercert.control.lock import ROLLOUT_LOCK
from clustercert.demo import DemoCluster, DemoNode, free_port

pytestmark = pytest.mark.cluster

REPEAT = max(1, int(os.environ.get("CLUSTERCERT_SOAK_REPEAT", "2")))
AGENT_TIMEOUT = 2.0
CONVERGE_TIMEOUT = 25.0
BASE_ARGS = (
    "--agent-timeout", str(AGENT_TIMEOUT), "--reconcile-interval", "0.2", "--lock-wait", "20",
)  # fmt: skip
DECIDED_STEPS = {"after_decision", "during_commit", "before_response"}

FIGURES: list[dict[str, Any]] = []


# --- the state every case must end in -------------------------------------------------------------


@dataclass(frozen=True)
class Converged:
    fingerprint: str
    generation: int


def _pair_loads(cert: Path, key: Path) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError):
        return False
    return True


def disk_problems(node: DemoNode, desired: dict[str, int]) -> list[str]:
    """What is wrong on ``node``'s disk against the desired generations (empty: nothing)."""
    problems: list[str] = []
    root = node.directory / "certs"
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            problems.append(f"leftover {entry}")
            continue
        if entry.name not in desired:
            problems.append(f"{entry.name} is not desired but on disk")
            continue
        try:
            current = int((entry / "current").read_text())
        except (OSError, ValueError):
            problems.append(f"{entry.name} has no current generation")
            continue
        if current != desired[entry.name]:
            problems.append(f"{entry.name}: current {current}, desired {desired[entry.name]}")
        for gen_dir in sorted(entry.iterdir()):
            if gen_dir.name.startswith("."):
                problems.append(f"leftover {gen_dir}")
            elif gen_dir.is_dir():
                generation = int(gen_dir.name)
                if generation > current:
                    problems.append(f"{entry.name}@{generation} staged beyond current {current}")
                key = gen_dir / "key.pem"
                if key.exists() and not _pair_loads(gen_dir / "cert.pem", key):
                    problems.append(f"{gen_dir}: certificate and key do not match")
    return problems


def lock_holder(cluster: DemoCluster) -> str | None:
    with cluster.cluster.open_store() as store:
        return store.lock_holder(ROLLOUT_LOCK)


def next_generation(cluster: DemoCluster) -> int:
    """The generation the next rollout of proxy gets: above every one ever staged."""
    with cluster.cluster.open_store() as store:
        state = cluster.cluster.state(store)
        desired = run(state.certificate("proxy"))
        used = run(state.generations_used()).get("proxy", 0)
    return max(desired.generation if desired else 0, used) + 1


def held_by_pid(cluster: DemoCluster, pid: int) -> bool:
    """Whether process ``pid`` holds the cluster lock (owners are HOST:BOOT:PID:START:ROLE)."""
    holder = lock_holder(cluster)
    return holder is not None and holder.split(":")[2] == str(pid)


def snapshot(cluster: DemoCluster) -> tuple[Converged | None, str]:
    """The converged state, or None and why not."""
    with cluster.cluster.open_store() as store:
        state = cluster.cluster.state(store)
        desired = {r.name: r for r in run(state.certificates())}
        in_flight = run(state.rollout_in_flight())
    if in_flight is not None:
        return None, f"rollout {in_flight.rollout_id} ({in_flight.phase}) still in flight"
    proxy = desired["proxy"]
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            return None, f"the agent of {node.name} is not running"
        if not accepts(node.agent_port):
            return None, f"the agent of {node.name} does not listen yet"
    served: dict[str, str] = {}
    for node in cluster.nodes:
        try:
            served[node.name] = served_fingerprint("127.0.0.1", node.redis_port)
        except OSError as exc:
            return None, f"{node.name} serves nothing: {exc}"
    if set(served.values()) != {proxy.fingerprint}:
        return None, f"served {served}, desired {proxy.fingerprint}@{proxy.generation}"
    try:
        with api(cluster) as client:
            detail = client.get("/v1/cluster/certificates/proxy").json()
            nodes = client.get("/v1/nodes").json()
    except httpx.HTTPError as exc:
        return None, f"the API does not answer: {exc!r}"
    if detail["fingerprint_sha256"] != proxy.fingerprint or not all(
        n["in_sync"] and n["fingerprint"] == proxy.fingerprint for n in detail["nodes"]
    ):
        return None, f"GET proxy says {detail['nodes']}"
    if len(nodes) != len(cluster.nodes) or not all(n["in_sync"] for n in nodes):
        return None, f"GET /v1/nodes says {nodes}"
    generations = {name: r.generation for name, r in desired.items()}
    for node in cluster.nodes:
        problems = disk_problems(node, generations)
        if problems:
            return None, f"{node.name}: {problems}"
    return Converged(proxy.fingerprint, proxy.generation), ""


def wait_converged(cluster: DemoCluster, timeout: float = CONVERGE_TIMEOUT) -> Converged:
    """Poll until converged; return the state. Fails after ``timeout``."""
    start = time.monotonic()
    why = ""
    while time.monotonic() - start < timeout:
        state, why = snapshot(cluster)
        if state is not None:
            return state
        time.sleep(0.1)
    raise AssertionError(f"split final state after {timeout} s: {why}")


def record(group: str, case: str, rep: int, final: str, seconds: float | None) -> None:
    FIGURES.append(
        {"group": group, "case": case, "rep": rep, "final": final, "converge_s": seconds}
    )


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    out = os.environ.get("CLUSTERCERT_RELIABILITY_OUT")
    if not out or not FIGURES:
        return
    times = sorted(f["converge_s"] for f in FIGURES if f["converge_s"] is not None)
    cases = sorted({(f["group"], f["case"]) for f in FIGURES})
    summary = {
        "repeat": REPEAT,
        "cases": len(cases),
        "runs": len(FIGURES),
        "split_final_states": sum(f["final"] == "split" for f in FIGURES),
        "converge_p50_s": round(statistics.median(times), 2) if times else None,
        "converge_max_s": round(max(times), 2) if times else None,
    }
    Path(out).write_text(json.dumps({"summary": summary, "runs": FIGURES}, indent=1) + "\n")


# --- driving the processes ------------------------------------------------------------------------


def events(cluster: DemoCluster) -> list[dict[str, Any]]:
    with api(cluster) as client:
        answer: list[dict[str, Any]] = client.get(
            "/v1/cluster/certificates/events", params={"limit": 50}
        ).json()["events"]
    return answer


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory, 3, *BASE_ARGS)
    yield running
    thaw(running)
    running.stop()


# --- the control plane killed at each step --------------------------------------------------------


@pytest.mark.parametrize("step", ROLLOUT_STEPS)
def test_control_plane_killed_at_each_step_recovers(fault_cluster: DemoCluster, step: str) -> None:
    cluster = fault_cluster
    wait_converged(cluster)
    restart_server(cluster, fault=step)
    for rep in range(REPEAT):
        before = wait_converged(cluster)
        generation = next_generation(cluster)
        body, fingerprint = proxy_body()
        assert cluster.server is not None
        dead_pid = cluster.server.pid
        with pytest.raises(httpx.TransportError):
            put(cluster, body)
        assert cluster.server.wait(timeout=30) == -signal.SIGKILL
        last = rep == REPEAT - 1
        start = time.monotonic()
        restart_server(cluster, fault=None if last else step)
        # A restarted control plane does not wait out the dead one's 30 s lease.
        wait_until(
            lambda pid=dead_pid: not held_by_pid(cluster, pid),
            timeout=10,
            what=f"the lock held by the killed pid {dead_pid} to be taken over",
        )
        try:
            state = wait_converged(cluster)
        except AssertionError:
            record("control plane killed", step, rep, "split", None)
            raise
        seconds = time.monotonic() - start
        decided = step in DECIDED_STEPS
        record("control plane killed", step, rep, "new" if decided else "old", seconds)
        if decided:
            assert state == Converged(fingerprint, generation)
        else:
            assert state == before
        recovered = [e for e in events(cluster) if e.get("recovered")]
        if step in ("during_stage", "after_decision", "during_commit"):
            assert recovered, "the restarted control plane recorded no recovery event"
            newest = recovered[0]
            assert newest["action"] == ("update" if decided else "abort")
            assert newest["generation"] == generation
        if last:
            # The client never got an answer; it retries the same request.
            # Decided: a no-op. Undecided: a new generation, never the aborted one's number.
            expected = generation if decided else next_generation(cluster)
            if step == "during_stage":
                assert expected == generation + 1  # the aborted rollout's number is skipped
            response = put(cluster, body)
            assert response.status_code == 200, response.text
            assert response.json()["generation"] == expected
            assert response.json()["fingerprint_sha256"] == fingerprint
            after = wait_converged(cluster)
            assert after == Converged(fingerprint, expected)


# --- an agent killed or frozen at each step -------------------------------------------------------

AGENT_CASES = {
    # case: (where the control plane pauses, what happens to one agent there)
    "kill_before_stage": ("after_validation", "kill"),
    "kill_during_stage": ("during_stage", "kill"),
    "kill_after_decision": ("after_decision", "kill"),
    "kill_during_commit": ("during_commit", "kill"),
    "freeze_during_stage": ("after_validation", "freeze"),
    "freeze_during_commit": ("after_decision", "freeze"),
}


@pytest.mark.parametrize("case", AGENT_CASES)
def test_agent_killed_or_frozen_at_each_step_converges(
    fault_cluster: DemoCluster, case: str
) -> None:
    cluster = fault_cluster
    step, action = AGENT_CASES[case]
    wait_converged(cluster)
    paused = marker(cluster, step)
    paused.unlink(missing_ok=True)
    restart_server(cluster, fault=f"pause:{step}")
    try:
        for rep in range(REPEAT):
            before = wait_converged(cluster)
            generation = next_generation(cluster)
            body, fingerprint = proxy_body()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                answer = pool.submit(put, cluster, body)
                wait_until(
                    lambda a=answer: paused.exists() or a.done(),
                    timeout=30,
                    what=f"the rollout to pause at {step}",
                )
                assert not answer.done(), f"it never paused at {step}: {answer.result().text}"
                # During stage or commit, hit a node other than the one that already finished.
                finished = paused.read_text().split("\n")[1]
                candidates = [n for n in cluster.nodes if n.name != finished]
                victim = candidates[rep % len(candidates)]
                assert victim.process is not None
                if action == "kill":
                    victim.process.kill()
                    victim.process.wait(timeout=10)
                else:
                    os.kill(victim.process.pid, signal.SIGSTOP)
                paused.unlink()
                response = answer.result(timeout=120)
            start = time.monotonic()
            if action == "kill":
                cluster.start_agent(victim)
            else:
                os.kill(victim.process.pid, signal.SIGCONT)
            try:
                state = wait_converged(cluster)
            except AssertionError:
                record("agent " + action, case, rep, "split", None)
                raise
            seconds = time.monotonic() - start
            aborted = response.status_code == 409 and "aborted" in response.json()["description"]
            record("agent " + action, case, rep, "old" if aborted else "new", seconds)
            if step == "after_validation":
                # The node was gone or frozen before it could stage: nothing changed anywhere.
                assert response.status_code == 409, response.text
                assert response.json()["error_code"] == "nodes_not_updated"
                assert aborted
            if step == "after_decision":
                # Decided, so it rolls forward; the node that missed the commit is named.
                assert response.status_code == 409, response.text
                failed = [n["name"] for n in response.json()["nodes"] if not n["ok"]]
                assert failed == [victim.name]
            if response.status_code == 200:
                assert all(n["ok"] for n in response.json()["nodes"])
            assert state == (before if aborted else Converged(fingerprint, generation)), (
                response.text
            )
    finally:
        thaw(cluster)
        paused.unlink(missing_ok=True)
    restart_server(cluster)


# --- failed reloads, and concurrent updates -------------------------------------------------------

RELOAD_SCRIPT = """#!/bin/sh
# A service reload as an operator would script it: $1 certificate file, $2 key file.
if [ -e "{flags}/refuse" ]; then echo "reload refused: {flags}/refuse exists" >&2; exit 3; fi
if [ -e "{flags}/pretend" ]; then echo "reload skipped"; exit 0; fi
out=$(redis-cli -s "{socket}" CONFIG SET tls-cert-file "$1" tls-key-file "$2")
[ "$out" = "OK" ] || {{ echo "CONFIG SET: $out" >&2; exit 4; }}
"""


def add_command_node(cluster: DemoCluster) -> tuple[DemoNode, Path]:
    """A node whose TLS service (a redis-server the agent does not supervise) is reloaded by a
    ``command`` service; returns it and the directory of its failure flags."""
    name = "node-cmd"
    directory = cluster.directory / "nodes" / name
    directory.mkdir(mode=0o700, parents=True)
    node = DemoNode(name, directory, free_port(), free_port())
    flags = directory / "flags"
    flags.mkdir()
    bootstrap = CA.new().issue("bootstrap.example", eku=["serverAuth"])
    cert, key = bootstrap.write(directory, "bootstrap")
    socket = directory / "svc.sock"
    subprocess.run(
        [
            "redis-server", "--port", "0", "--bind", "127.0.0.1",
            "--tls-port", str(node.redis_port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cluster.cluster.ca_file),
            "--tls-auth-clients", "no", "--unixsocket", str(socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--pidfile", str(directory / "redis.pid"), "--logfile", str(directory / "redis.log"),
            "--daemonize", "yes",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: accepts(node.redis_port), timeout=10, what="the service redis to listen")
    script = directory / "reload.sh"
    script.write_text(RELOAD_SCRIPT.format(flags=flags, socket=socket))
    with cluster.cluster.open_store() as store:
        token = run(
            cluster.cluster.state(store).new_join_token(
                dt.datetime.now(dt.UTC), dt.timedelta(minutes=10)
            )
        )
    node.config_file.write_text(
        "\n".join(
            [
                f'name = "{name}"',
                f'data_dir = "{directory}"',
                f'listen = "127.0.0.1:{node.agent_port}"',
                f'control_plane_url = "{cluster.api_url}"',
                f'ca_file = "{cluster.cluster.ca_file}"',
                f'join_token = "{token}"',
                "",
                "[[services]]",
                'name = "tls-service"',
                'type = "command"',
                'certificate = "proxy"',
                f'command = ["/bin/sh", "{script}", "{{cert}}", "{{key}}"]',
                f'address = "127.0.0.1:{node.redis_port}"',
            ]
        )
        + "\n"
    )
    cluster.nodes.append(node)
    cluster.start_agent(node)
    return node, flags


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DemoCluster, Path]]:
    """Three supervised-redis nodes and one whose service is reloaded by a command."""
    running = start_cluster(tmp_path_factory, 3, *BASE_ARGS)
    try:
        _, flags = add_command_node(running)
        wait_converged(running)
    except BaseException:
        running.stop()
        raise
    yield running, flags
    running.stop()


def node_answer(response: httpx.Response, name: str) -> dict[str, Any]:
    by_name = {n["name"]: n for n in response.json()["nodes"]}
    answer: dict[str, Any] = by_name[name]
    return answer


def served_in_answer(node: dict[str, Any]) -> set[str]:
    return {
        s["served_fingerprint"]
        for c in node["certificates"]
        for s in c["services"]
        if s.get("served_fingerprint")
    }


def test_redis_that_refuses_the_files_keeps_the_old_certificate_then_converges(
    mixed_cluster: tuple[DemoCluster, Path],
) -> None:
    cluster, _ = mixed_cluster
    before = wait_converged(cluster)
    generation = next_generation(cluster)
    refusing = cluster.nodes[0]
    admin = redis.Redis(unix_socket_path=str(refusing.directory / "redis.sock"))
    admin.execute_command("ACL", "SETUSER", "default", "-config|set")
    try:
        # From a root every node trusts already: a new root would stop at the trust phase,
        # before anything is staged (test_trust_phases.py); this test is about the commit.
        body, fingerprint = internal_proxy_body(cluster)
        response = put(cluster, body)
        assert response.status_code == 409, response.text
        assert response.json()["error_code"] == "nodes_not_updated"
        answer = node_answer(response, refusing.name)
        assert answer["ok"] is False
        assert "refused CONFIG SET" in answer["error"] and "no permissions" in answer["error"]
        assert served_in_answer(answer) == {before.fingerprint}
        assert served_fingerprint("127.0.0.1", refusing.redis_port) == before.fingerprint
        others = [n for n in cluster.nodes if n is not refusing]
        assert {served_fingerprint("127.0.0.1", n.redis_port) for n in others} == {fingerprint}
        # The reconciler keeps trying; while redis refuses, the old certificate keeps serving.
        time.sleep(1.0)
        assert served_fingerprint("127.0.0.1", refusing.redis_port) == before.fingerprint
        # A retry of the same request while it still refuses: no new generation, still 409.
        retry = put(cluster, body)
        assert retry.status_code == 409, retry.text
        with api(cluster) as client:
            detail = client.get("/v1/cluster/certificates/proxy").json()
        assert detail["generation"] == generation
        lagging = [n["name"] for n in detail["nodes"] if not n["in_sync"]]
        assert lagging == [refusing.name]
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+config|set")
        admin.close()
    state = wait_converged(cluster)
    assert state == Converged(fingerprint, generation)
    # Retrying the request that has now succeeded everywhere is a no-op that answers 200.
    again = put(cluster, body)
    assert again.status_code == 200, again.text
    assert again.json()["generation"] == generation


@pytest.mark.parametrize(
    ("flag", "expected_error"),
    [("refuse", "exited with 3: reload refused"), ("pretend", "still serves")],
)
def test_command_reload_that_fails_keeps_the_old_certificate_then_converges(
    mixed_cluster: tuple[DemoCluster, Path], flag: str, expected_error: str
) -> None:
    cluster, flags = mixed_cluster
    before = wait_converged(cluster)
    generation = next_generation(cluster)
    node = next(n for n in cluster.nodes if n.name == "node-cmd")
    (flags / flag).touch()
    try:
        body, fingerprint = proxy_body()
        response = put(cluster, body)
        assert response.status_code == 409, response.text
        answer = node_answer(response, node.name)
        assert answer["ok"] is False
        assert expected_error in answer["error"]
        assert served_in_answer(answer) == {before.fingerprint}
        assert served_fingerprint("127.0.0.1", node.redis_port) == before.fingerprint
        assert all(node_answer(response, n.name)["ok"] for n in cluster.nodes if n is not node)
    finally:
        (flags / flag).unlink()
    # Fixed: the reconciler converges without anyone retrying.
    state = wait_converged(cluster)
    assert state == Converged(fingerprint, generation)


def test_second_update_waits_for_the_lock_then_gets_409_update_in_progress(
    mixed_cluster: tuple[DemoCluster, Path],
) -> None:
    cluster, _ = mixed_cluster
    wait_converged(cluster)
    generation = next_generation(cluster)
    paused = marker(cluster, "after_decision")
    saved_args = cluster.server_args
    cluster.server_args = (*BASE_ARGS, "--lock-wait", "1")  # the last --lock-wait wins
    try:
        restart_server(cluster, fault="pause:after_decision")
        first_body, first = proxy_body()
        second_body, _ = proxy_body()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(put, cluster, first_body)
            wait_until(paused.exists, timeout=30, what="the first update to hold the lock")
            second = put(cluster, second_body)
            paused.unlink()
            first_response = answer.result(timeout=60)
        assert second.status_code == 409, second.text
        assert second.json()["error_code"] == "update_in_progress"
        assert "waited 1 s" in second.json()["description"]
        assert first_response.status_code == 200, first_response.text
        state = wait_converged(cluster)
        assert state == Converged(first, generation)
    finally:
        paused.unlink(missing_ok=True)
        cluster.server_args = saved_args
        restart_server(cluster)


def test_concurrent_updates_are_serialised(mixed_cluster: tuple[DemoCluster, Path]) -> None:
    cluster, _ = mixed_cluster
    wait_converged(cluster)
    generation = next_generation(cluster)
    bodies = [proxy_body() for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda b: put(cluster, b[0]), bodies))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    generations = sorted(r.json()["generation"] for r in responses)
    assert generations == [generation, generation + 1]
    last = max(responses, key=lambda r: r.json()["generation"])
    state = wait_converged(cluster)
    assert state == Converged(last.json()["fingerprint_sha256"], generation + 1)
