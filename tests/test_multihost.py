"""Many hosts (issue #13): docs/deploy.md, run across network namespaces.

One control plane host, three node hosts and the operator's workstation, each a network
namespace with its own address on a bridge (tests/netns.py). Every process runs inside them,
the operator's commands too: the root namespace of this machine reaches anything through a
proxy, so nothing here connects from it. The commands are the ones docs/deploy.md shows.

One cluster for the module; the tests run in file order and each leaves it converged.
Measured, not asserted (printed, and written to build/multihost.json when that directory
exists): join time per node, and convergence after a partition heals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import Network, available

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.multihost,
    pytest.mark.skipif(available() is not None, reason=str(available())),
    pytest.mark.timeout(600),
]

PASSWORD = "correct horse battery staple"
USER = "admin@cluster.local"
CP_NAME = "cp.cluster.test"  # in every host's /etc/hosts, and in the api certificate
ALIAS = "alias.cluster.test"  # resolves to the control plane, but no certificate names it
NODES = ("node1", "node2", "node3")
WORKSTATION = Path(__file__).with_name("workstation.py")
ROOT = Path(__file__).resolve().parent.parent
FIGURES: dict[str, Any] = {}


def clustercert(*args: str) -> list[str]:
    return [sys.executable, "-m", "clustercert", *args]


@dataclass
class Cluster:
    network: Network
    base: Path
    logs: Path
    server: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)

    @property
    def cp_dir(self) -> Path:
        return self.base / "cp" / "var-lib-clustercert"

    def node_dir(self, node: str) -> Path:
        return self.base / node / "var-lib-clustercert"

    def config(self, node: str) -> Path:
        return self.base / node / "etc-clustercert" / "agent.toml"

    def address(self, host: str) -> str:
        return self.network.hosts[host].address

    # --- the control plane host ----------------------------------------------------------

    def start_server(self, fault: str | None = None) -> None:
        env = {**os.environ, "CLUSTERCERT_FAULT": fault} if fault else None
        with (self.logs / "server.log").open("ab") as log:
            self.server = self.network.spawn(
                "cp",
                # A short watch resync: a node behind a cut link keeps its idle watch
                # connection until it is due again, so it is seen unreachable within
                # --watch-resync + --agent-timeout (TCP keepalive alone takes about a minute).
                clustercert("server", "--dir", str(self.cp_dir), "--listen", "0.0.0.0:9443",
                            "--agent-timeout", "3", "--watch-resync", "3"),
                log=log, env=env,
            )  # fmt: skip
        self.wait_nodes("isinstance(nodes, list)", 60)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=30)

    def join_token(self) -> str:
        result = self.network.run("cp", clustercert("join-token", "--dir", str(self.cp_dir)))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    # --- node hosts ----------------------------------------------------------------------

    def write_config(self, node: str, token: str, url: str, **extra: str) -> None:
        """/etc/clustercert/agent.toml as docs/deploy.md writes it."""
        address = self.address(node)
        data_dir = self.node_dir(node)
        lines = [
            f'name = "{node}"',
            f'data_dir = "{data_dir}"',
            'listen = "0.0.0.0:9444"',
            f'advertise_url = "https://{address}:9444"',
            f'control_plane_url = "{url}"',
            f'join_token = "{token}"',
            *(f'{k} = "{v}"' for k, v in extra.items()),
            "",
            "[[services]]",
            'name = "redis"',
            'type = "redis"',
            'certificate = "proxy"',
            f'socket = "{data_dir / "redis.sock"}"',
            f'address = "{address}:6380"',
            "supervise = true",
        ]
        self.config(node).parent.mkdir(parents=True, exist_ok=True)
        self.config(node).write_text("\n".join(lines) + "\n")

    def start_agent(self, node: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{node}.log").open("ab") as log:
            process = self.network.spawn(
                node, clustercert("agent", "--config", str(self.config(node))), log=log
            )
        self.agents[node] = process
        return process

    def run_agent_once(self, node: str) -> subprocess.CompletedProcess[str]:
        """Start the agent and expect it to refuse (exit) within a minute."""
        return self.network.run(
            node, clustercert("agent", "--config", str(self.config(node))), timeout=60
        )

    def redis_pid(self, node: str) -> int | None:
        try:
            return int((self.node_dir(node) / "redis.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    # --- the workstation -----------------------------------------------------------------

    @property
    def operator_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CLUSTERCERT_URL": f"https://{CP_NAME}:9443",
            "CLUSTERCERT_USER": USER,
            "CLUSTERCERT_PASSWORD": PASSWORD,
            # docs/deploy.md: copied once from the control plane ("scp")
            "CLUSTERCERT_CA_FILE": str(self.base / "ws" / "clustercert-ca.pem"),
        }

    def operator(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.network.run("ws", clustercert(*args), timeout=timeout, env=self.operator_env)

    def spawn_operator(self, *args: str) -> subprocess.Popen[bytes]:
        return self.network.spawn(
            "ws", clustercert(*args), log=subprocess.PIPE, env=self.operator_env
        )

    def wait_nodes(self, expression: str, timeout: float) -> dict[str, Any]:
        """Poll GET /v1/nodes from the workstation until ``expression`` holds."""
        result = self.network.run(
            "ws", [sys.executable, str(WORKSTATION), "wait-nodes", expression, str(timeout)],
            timeout=timeout + 30, env=self.operator_env,
        )  # fmt: skip
        answer: dict[str, Any] = json.loads(result.stdout or "{}")
        assert result.returncode == 0, f"{expression} never held: {answer or result.stderr}"
        return answer

    def served(self, node: str) -> str:
        """What node's redis serves (SHA-256), by a handshake from the workstation."""
        return self.served_with_names(node)[0]

    def served_with_names(self, node: str) -> tuple[str, list[str]]:
        result = self.network.run(
            "ws", [sys.executable, str(WORKSTATION), "served", self.address(node), "6380"]
        )
        assert result.returncode == 0, result.stderr
        fingerprint, names = result.stdout.split("\n", 1)
        return fingerprint, names.split()

    def wait_proxy_names(self, nodes: tuple[str, ...], timeout: float = 90) -> None:
        """Until every node serves a `proxy` naming exactly the addresses of ``nodes``: the
        re-issue after a join or a removal is done (no rollout left to start behind a test)."""
        wanted = {self.address(n) for n in nodes}
        deadline = time.monotonic() + timeout
        seen: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            seen = {n: self.served_with_names(n)[1] for n in nodes}
            if all(
                {a for a in names if a.startswith("10.77.")} == wanted for names in seen.values()
            ):
                return
            time.sleep(0.5)
        raise AssertionError(f"proxy never named exactly {sorted(wanted)}: {seen}")

    def desired(self, name: str) -> dict[str, Any]:
        result = self.operator("certificates", "show", name)
        assert result.returncode == 0, result.stderr
        detail: dict[str, Any] = json.loads(result.stdout)
        return detail

    def serving_desired_proxy(self, nodes: tuple[str, ...], timeout: float = 60) -> str:
        """Wait until every one of ``nodes`` serves the desired `proxy` (a background
        re-issue, after a join or a removal, may still be rolling out); its fingerprint."""
        deadline = time.monotonic() + timeout
        served: dict[str, str] = {}
        while time.monotonic() < deadline:
            desired = self.desired("proxy")["fingerprint_sha256"]
            served = {n: self.served(n) for n in nodes}
            if set(served.values()) == {desired}:
                return str(desired)
            time.sleep(0.5)
        raise AssertionError(f"the nodes never all served the desired proxy: {served}")


def _all_in_sync(count: int) -> str:
    return f"len(nodes) == {count} and all(n['in_sync'] and n['reachable'] for n in nodes)"


def _node(name: str) -> str:
    return f"[n for n in nodes if n['name'] == {name!r}][0]"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("multihost")
    logs = base / "logs"
    logs.mkdir()
    with Network() as network:
        for host in ("cp", *NODES, "ws"):
            network.add_host(host)
        network.add_name(CP_NAME, "cp")
        network.add_name(ALIAS, "cp")
        running = Cluster(network, base, logs)
        # docs/deploy.md step 2, on the control plane host.
        init = network.run("cp", clustercert(
            "init", "--dir", str(running.cp_dir), "--admin-password", PASSWORD,
            "--san", running.address("cp"), "--san", CP_NAME,
        ))  # fmt: skip
        assert init.returncode == 0, init.stderr
        (base / "ws").mkdir()
        (base / "ws" / "clustercert-ca.pem").write_bytes((running.cp_dir / "ca.pem").read_bytes())
        running.start_server()
        # Step 3 on each node: node1 and node2 reach the control plane by IP, node3 by name.
        joins = {}
        for node in NODES:
            url = f"https://{CP_NAME if node == 'node3' else running.address('cp')}:9443"
            running.write_config(node, running.join_token(), url)
            started = time.monotonic()
            running.start_agent(node)
            answer = running.wait_nodes(
                f"any(n['name'] == {node!r} and n['in_sync'] for n in nodes)", 90
            )
            joins[node] = round(time.monotonic() - started, 2)
            running.uids[node] = next(n["uid"] for n in answer["nodes"] if n["name"] == node)
        FIGURES["join_seconds"] = joins
        running.wait_proxy_names(NODES)
        try:
            yield running
        finally:
            for process in running.agents.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            running.stop_server()
            for process in running.agents.values():
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
            _write_figures()


def _write_figures() -> None:
    print(f"\nmultihost figures: {json.dumps(FIGURES)}")
    build = ROOT / "build"
    if build.is_dir():
        (build / "multihost.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


# --- joining -----------------------------------------------------------------------------------


def test_nodes_join_by_ip_and_by_name_with_only_a_token(cluster: Cluster) -> None:
    answer = cluster.wait_nodes(_all_in_sync(3), 60)
    assert sorted(n["name"] for n in answer["nodes"]) == list(NODES)
    for node in NODES:
        assert "ca_file" not in cluster.config(node).read_text()
        ca = cluster.node_dir(node) / "ca.pem"  # fetched and checked against the token's pin
        assert ca.read_bytes() == (cluster.cp_dir / "ca.pem").read_bytes()
        assert ca.stat().st_mode & 0o777 == 0o644
    cluster.serving_desired_proxy(NODES)


def test_a_join_by_a_name_the_certificate_lacks_says_so(cluster: Cluster) -> None:
    cluster.network.add_host("node4")
    token = cluster.join_token()
    cluster.write_config("node4", token, f"https://{ALIAS}:9443")
    result = cluster.run_agent_once("node4")
    assert result.returncode != 0, result.stderr
    assert (
        f"the control plane's certificate does not name {ALIAS} (it names: cluster.local, "
        f"localhost, 127.0.0.1, ::1, {cluster.address('cp')}, {CP_NAME}); start the control "
        f"plane with `clustercert server --advertise {ALIAS}`"
    ) in result.stderr
    # A token whose pin is not this cluster's CA: refused before the secret is sent.
    bad = token[: token.index("sha256:") + 7] + "0" * 64
    cluster.write_config("node4", bad, f"https://{cluster.address('cp')}:9443")
    refused = cluster.run_agent_once("node4")
    assert refused.returncode == 2
    assert "but the join token pins sha256:" + "0" * 64 in refused.stderr
    assert not (cluster.node_dir("node4") / "identity").exists()
    assert len(cluster.wait_nodes("True", 10)["nodes"]) == 3  # nothing joined


# --- rotation, partitions ------------------------------------------------------------------------


def test_rotation_reaches_every_host(cluster: Cluster) -> None:
    before = cluster.desired("proxy")["fingerprint_sha256"]
    result = cluster.operator("certificates", "rotate", "proxy")
    assert result.returncode == 0, result.stderr
    assert cluster.serving_desired_proxy(NODES) != before


def test_an_unreachable_node_is_shown_as_such(cluster: Cluster) -> None:
    cluster.network.link_down("node3")
    try:
        answer = cluster.wait_nodes(
            f"not {_node('node3')}['reachable'] and not {_node('node3')}['in_sync']", 60
        )
        node3 = next(n for n in answer["nodes"] if n["name"] == "node3")
        assert node3["last_seen"] is not None
        assert all(n["reachable"] and n["in_sync"] for n in answer["nodes"] if n is not node3)
        listed = cluster.operator("nodes", "list")
        assert listed.returncode == 0
        assert "node3" in listed.stdout and "no" in listed.stdout
    finally:
        healed_at = time.monotonic()
        cluster.network.link_up("node3")
    cluster.wait_nodes(_all_in_sync(3), 90)
    # Wall clock from the link coming back, including the poller's own start (~0.5 s).
    FIGURES["reachable_and_in_sync_after_heal_seconds"] = round(time.monotonic() - healed_at, 2)


def _rotate_with_a_cut(cluster: Cluster, step: str, node: str) -> dict[str, Any]:
    """Rotate proxy; at ``step`` (the control plane paused there) cut ``node``'s link; heal
    it once the answer is in, and measure how long the cluster takes to converge."""
    cluster.stop_server()
    cluster.start_server(fault=f"pause:{step}")
    marker = cluster.cp_dir / "run" / f"fault-paused-{step}"
    try:
        rotation = cluster.spawn_operator("certificates", "rotate", "proxy")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the rollout never reached {step}"
        cluster.network.link_down(node)
        marker.unlink()
        output, _ = rotation.communicate(timeout=120)
        healed_at = time.monotonic()
        cluster.network.link_up(node)
        answer = cluster.wait_nodes(_all_in_sync(3), 120)
        converged = time.monotonic() - healed_at
    finally:
        cluster.network.link_up(node)
        cluster.stop_server()
        cluster.start_server()
    cluster.serving_desired_proxy(NODES)  # one certificate everywhere, no split
    return {
        "exit": rotation.returncode,
        "output": output.decode(errors="replace"),
        "converged_seconds": round(converged, 2),
        "nodes": answer["nodes"],
    }


def test_link_cut_during_stage(cluster: Cluster) -> None:
    outcome = _rotate_with_a_cut(cluster, "during_stage", "node2")
    # Either node2 had staged before its cable was cut (then commit lags: 409, and the
    # reconciler finishes it) or it had not (abort: 409, nothing changed); both 409.
    assert outcome["exit"] == 4, outcome["output"]
    FIGURES["converge_after_heal_stage_cut_seconds"] = outcome["converged_seconds"]


def test_link_cut_during_commit(cluster: Cluster) -> None:
    outcome = _rotate_with_a_cut(cluster, "during_commit", "node2")
    assert outcome["exit"] in (0, 4), outcome["output"]
    FIGURES["converge_after_heal_commit_cut_seconds"] = outcome["converged_seconds"]


# --- removing a node -----------------------------------------------------------------------------


def test_remove_a_dead_node_then_update_without_it(cluster: Cluster) -> None:
    cluster.network.link_down("node3")
    cluster.wait_nodes(f"not {_node('node3')}['reachable']", 60)
    blocked = cluster.operator("certificates", "rotate", "proxy")
    assert blocked.returncode == 4  # cannot stage on node3: nothing changed
    uid = cluster.uids["node3"]
    removed = cluster.operator("nodes", "remove", str(uid))
    assert removed.returncode == 0, removed.stderr
    assert f"removed node {uid}: node3" in removed.stdout
    again = cluster.operator("nodes", "remove", str(uid))
    assert again.returncode != 0 and "no node with id" in again.stderr
    cluster.wait_nodes(_all_in_sync(2), 60)
    cluster.wait_proxy_names(("node1", "node2"))  # re-issued without node3's address
    result = cluster.operator("certificates", "rotate", "proxy")
    assert result.returncode == 0, result.stderr
    assert [n["name"] for n in cluster.desired("proxy")["nodes"]] == ["node1", "node2"]
    cluster.serving_desired_proxy(("node1", "node2"))


def test_a_removed_node_stays_out_when_it_returns(cluster: Cluster) -> None:
    old = cluster.served("node1")
    cluster.network.link_up("node3")
    # Its agent is still running with its old identity: nobody calls it any more.
    time.sleep(3)
    answer = cluster.wait_nodes(_all_in_sync(2), 30)
    assert "node3" not in [n["name"] for n in answer["nodes"]]
    assert cluster.served("node3") != old  # it did not receive the last rotation
    # Joining again with the token it used once is refused; a new token makes a new node.
    cluster.agents["node3"].send_signal(signal.SIGTERM)
    cluster.agents["node3"].wait(timeout=30)
    identity = cluster.node_dir("node3") / "identity"
    for path in identity.iterdir():
        path.unlink()
    identity.rmdir()
    used = cluster.config("node3").read_text()
    refused = cluster.run_agent_once("node3")
    assert refused.returncode != 0
    assert "the join token is unknown, already used or expired" in refused.stderr
    cluster.config("node3").write_text(
        used.replace(used.split('join_token = "')[1].split('"')[0], cluster.join_token())
    )
    cluster.start_agent("node3")
    answer = cluster.wait_nodes(_all_in_sync(3), 90)
    cluster.wait_proxy_names(NODES)
    uid = next(n["uid"] for n in answer["nodes"] if n["name"] == "node3")
    assert uid != cluster.uids["node3"]
    cluster.uids["node3"] = uid


# --- stopping an agent ---------------------------------------------------------------------------


def test_sigterm_to_an_agent_stops_its_redis(cluster: Cluster) -> None:
    agent = cluster.agents["node1"]
    redis_pid = cluster.redis_pid("node1")
    assert redis_pid is not None
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{redis_pid}").exists(), "redis-server outlived its agent"
    cluster.start_agent("node1")
    cluster.wait_nodes(_all_in_sync(3), 90)
