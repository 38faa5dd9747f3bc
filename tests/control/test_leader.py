"""Several control planes on a 3-member etcd (DESIGN §13 HA): one leader, handed over within one
lease when it dies (idle, mid-stage, after the decision); no update refused for a dead holder;
only the leader asks the nodes; an etcd member's death is invisible, a majority's loss is a
503 ``store_unavailable`` while the nodes keep serving; the outage is logged once, not every
second.

Real processes: three etcd members, two `clustercert server` processes over one cluster
directory, two agents with redis-server. Each control plane runs in its own UTS namespace
(``unshare -u``) under its own host name, so that a killed one is, to the other, a process of
another host: proved dead only by its lease running out, as across machines (on one host a
dead holder is taken over at once, see control/lock.py).

The measured figures are printed (``-s`` shows them); no test asserts a duration.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from clusterkit import api, proxy_body, served_by_node, wait_until
from conftest import ADMIN_PASSWORD
from cryptography import x509
from store_fixtures import EtcdCluster

from clustercert.demo import DemoCluster, free_port

pytestmark = pytest.mark.cluster

LEASE = 10.0  # the default --leader-ttl, and the cluster lock's lease (control/lock.py)
PREFIX = "clustercert-ha"


@dataclass
class ControlPlanes:
    """The control planes of one cluster directory, by name (also each one's host name)."""

    cluster: DemoCluster
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, fault: str | None = None, *extra: str) -> None:
        port = self.ports.setdefault(name, free_port())
        env = {k: v for k, v in os.environ.items() if k != "CLUSTERCERT_FAULT"}
        if fault is not None:
            env["CLUSTERCERT_FAULT"] = fault
        console = self.cluster.console_port if name == "cp-a" else free_port()
        (self.cluster.directory / "logs").mkdir(exist_ok=True)
        log = (self.cluster.directory / "logs" / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh",
             sys.executable, "-m", "clustercert", "server", "--dir", str(self.cluster.directory),
             "--listen", f"127.0.0.1:{port}", "--console-listen", f"127.0.0.1:{console}",
             *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        log.close()
        wait_until(lambda: _answers(self.view(name)), timeout=60, what=f"control plane {name}")

    def view(self, name: str) -> DemoCluster:
        return DemoCluster(
            self.cluster.directory, api_port=self.ports[name], admin_password=ADMIN_PASSWORD
        )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def wait_dead(self, name: str, timeout: float = 60) -> None:
        """Until ``name`` (armed with a SIGKILL fault) is gone."""
        process = self.processes.pop(name)
        process.wait(timeout=timeout)

    def log(self, name: str) -> str:
        return (self.cluster.directory / "logs" / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


class HaCluster(DemoCluster):
    """A demo cluster whose first control plane is ``cp-a`` of :class:`ControlPlanes`."""

    planes: ControlPlanes

    def start_server(self) -> None:
        self.planes = ControlPlanes(self)
        self.planes.ports["cp-a"] = self.api_port
        self.planes.start("cp-a")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    members = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    yield members
    members.stop()


@pytest.fixture(scope="module")
def ha(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaCluster]:
    cluster = HaCluster(
        tmp_path_factory.mktemp("ha"),
        nodes_count=2,
        api_port=free_port(),
        console_port=free_port(),
        admin_password=ADMIN_PASSWORD,
        store_url=etcd.store_url(PREFIX),
    )
    try:
        cluster.start()
        cluster.planes.start("cp-b")
        yield cluster
    finally:
        with contextlib.suppress(AttributeError):
            cluster.planes.stop()
        cluster.stop()


# --- helpers ---------------------------------------------------------------------------------


def _answers(view: DemoCluster) -> bool:
    try:
        with api(view) as client:
            return client.get("/v1/nodes").status_code == 200
    except httpx.HTTPError:
        return False


def _control_planes(view: DemoCluster) -> list[dict[str, Any]]:
    with api(view) as client:
        response = client.get("/v1/cluster/control_planes")
    assert response.status_code == 200, response.text
    planes: list[dict[str, Any]] = response.json()["control_planes"]
    return planes


def _leader(ha: HaCluster, asking: str) -> str | None:
    """The name of the live leader as control plane ``asking`` sees it (by port)."""
    try:
        planes = _control_planes(ha.planes.view(asking))
    except httpx.HTTPError:
        return None
    ports = {f"127.0.0.1:{port}": name for name, port in ha.planes.ports.items()}
    leaders = [ports.get(p["name"]) for p in planes if p["leader"]]
    return leaders[0] if len(leaders) == 1 else None


def _settled(ha: HaCluster) -> str:
    """Wait until every running control plane agrees on one leader and shows every node in
    sync; return the leader's name."""

    def agreed() -> str | None:
        seen = {_leader(ha, name) for name in ha.planes.processes}
        if len(seen) != 1 or None in seen:
            return None
        for name in ha.planes.processes:
            with api(ha.planes.view(name)) as client:
                nodes = client.get("/v1/nodes").json()
            if not all(n["in_sync"] for n in nodes):
                return None
        return seen.pop()

    leader: str = wait_until(agreed, timeout=90, interval=0.5, what="one leader, nodes in sync")
    return leader


def _other(ha: HaCluster, name: str) -> str:
    (other,) = [n for n in ha.planes.processes if n != name]
    return other


def _metric(view: DemoCluster, pattern: str) -> float:
    with api(view) as client:
        text = client.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+]+)$", text, re.M))


def _update(ha: HaCluster, through: str) -> float:
    """PUT a new proxy certificate through control plane ``through``: one request, answered
    200 (never 409 update_in_progress), every node then serving it. Returns its seconds."""
    body, fingerprint = proxy_body()
    started = time.monotonic()
    with api(ha.planes.view(through)) as client:
        response = client.put("/v1/cluster/update_cert", json=body)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert set(served_by_node(ha).values()) == {fingerprint}
    return took


def _report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.1f} s")


# --- tests -----------------------------------------------------------------------------------


def test_one_leader_asks_the_nodes_and_every_control_plane_reports_them(ha: HaCluster) -> None:
    leader = _settled(ha)
    follower = _other(ha, leader)
    planes = _control_planes(ha.planes.view(follower))
    assert sorted(p["name"] for p in planes) == sorted(
        f"127.0.0.1:{port}" for port in ha.planes.ports.values()
    )
    assert [p["leader"] for p in planes].count(True) == 1
    assert all(p["alive"] for p in planes)
    assert [p["this"] for p in planes].count(True) == 1
    assert _metric(ha.planes.view(leader), r"clustercert_control_plane_leader") == 1
    assert _metric(ha.planes.view(follower), r"clustercert_control_plane_leader") == 0

    # Only the leader calls the agents while idle (status passes, watches); the follower none.
    before = _metric(ha.planes.view(follower), r"clustercert_agent_calls_total\{[^}]*\}")
    calls = _metric(ha.planes.view(leader), r"clustercert_agent_calls_total\{[^}]*\}")
    assert calls > 0
    time.sleep(3)
    assert _metric(ha.planes.view(follower), r"clustercert_agent_calls_total\{[^}]*\}") == before
    assert before == 0

    # An update through the follower: it takes the lock and rolls out itself.
    _update(ha, follower)


def test_leader_killed_while_idle_is_replaced_within_a_lease(ha: HaCluster) -> None:
    leader = _settled(ha)
    survivor = _other(ha, leader)
    ha.planes.kill(leader)
    killed = time.monotonic()
    wait_until(lambda: _leader(ha, survivor) == survivor, timeout=3 * LEASE, interval=0.1,
               what="the survivor to lead")  # fmt: skip
    _report("leader killed while idle -> new leader", time.monotonic() - killed)
    took = _update(ha, survivor)
    _report("leader killed while idle -> next update answered (its duration)", took)
    with api(ha.planes.view(survivor)) as client:
        nodes = client.get("/v1/nodes").json()
    assert nodes and all(n["in_sync"] and n["reachable"] for n in nodes), nodes
    ha.planes.start(leader)  # back, as a follower
    assert _settled(ha) == survivor


@pytest.mark.parametrize("step", ["during_stage", "after_decision"])
def test_leader_killed_mid_update_is_finished_or_aborted_and_never_blocks(
    ha: HaCluster, step: str
) -> None:
    leader = _settled(ha)
    survivor = _other(ha, leader)
    # Restart the leader armed: as a process of the same host, it takes over the key of its
    # dead previous incarnation at once. Should the other have taken it first, stop that one
    # cleanly (it releases the key) and start it again.
    ha.planes.kill(leader)
    ha.planes.start(leader, fault=step)
    if _settled(ha) != leader:
        ha.planes.processes[survivor].terminate()
        ha.planes.processes.pop(survivor).wait(timeout=30)
        ha.planes.start(survivor)
    assert _settled(ha) == leader

    body, fingerprint = proxy_body()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def put() -> int | None:
            try:
                with api(ha.planes.view(leader)) as client:
                    return client.put("/v1/cluster/update_cert", json=body).status_code
            except httpx.HTTPError:
                return None  # the control plane died mid-request

        answer = pool.submit(put)
        ha.planes.wait_dead(leader)  # it SIGKILLs itself holding the lock and the leader key
        killed = time.monotonic()
        assert answer.result(timeout=30) is None
    # The next update, sent at once, waits for the dead holder's lease on the cluster lock (a
    # lease shorter than the lock wait): never refused as update_in_progress. It finishes
    # (after the decision) or aborts (before it) what the dead one left, then applies itself.
    _update(ha, survivor)
    _report(f"leader killed at {step} -> next update answered", time.monotonic() - killed)
    wait_until(lambda: _leader(ha, survivor) == survivor, timeout=3 * LEASE, interval=0.1,
               what="the survivor to lead")  # fmt: skip
    _report(f"leader killed at {step} -> new leader", time.monotonic() - killed)
    with api(ha.planes.view(survivor)) as client:
        events = client.get("/v1/cluster/certificates/events", params={"limit": 20}).json()
    applied = [e.get("new_fingerprint") for e in events["events"] if e.get("name") == "proxy"]
    assert (fingerprint in applied) == (step == "after_decision"), events
    ha.planes.start(leader)
    assert _settled(ha) == survivor


def test_store_member_loss_is_invisible_and_majority_loss_is_a_503(
    ha: HaCluster, etcd: EtcdCluster
) -> None:
    leader = _settled(ha)
    follower = _other(ha, leader)

    # One member dies during a rotation (the first the store URL names: the one in use).
    body, fingerprint = proxy_body()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def put() -> httpx.Response:
            with api(ha.planes.view(follower)) as client:
                return client.put("/v1/cluster/update_cert", json=body)

        answer = pool.submit(put)
        time.sleep(0.3)
        etcd.kill(0)
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    assert set(served_by_node(ha).values()) == {fingerprint}
    _update(ha, leader)  # and through the other control plane, with one member down

    # A second member: no quorum. Updates are refused with a clear 503; nodes keep serving.
    served = served_by_node(ha)
    etcd.kill(1)
    lost = time.monotonic()
    body, _ = proxy_body()
    with api(ha.planes.view(follower)) as client:
        response = client.put("/v1/cluster/update_cert", json=body)
    _report("majority of etcd lost -> update refused", time.monotonic() - lost)
    assert response.status_code == 503, response.text
    error = response.json()
    assert error["error_code"] == "store_unavailable"
    assert "etcd store at" in error["description"]
    assert error["message"] == error["description"]
    assert served_by_node(ha) == served  # proven by handshake: nothing changed, still served
    time.sleep(5)  # let every background loop fail a few times

    # Recovery: the members come back; updates go through again.
    etcd.restart(0)
    etcd.restart(1)
    for index in range(3):
        etcd.wait_healthy(index)
    back = time.monotonic()
    _settled(ha)
    _report("etcd quorum back -> control planes settled", time.monotonic() - back)
    _update(ha, follower)

    # The outage is in each control plane's log once, in one line each way, without tracebacks.
    for name in ha.planes.processes:
        log = ha.planes.log(name)
        assert log.count("store unavailable (") == 1, log[-3000:]
        assert log.count("store available again") == 1, log[-3000:]
        outage = log[log.index("store unavailable (") : log.index("store available again")]
        assert "Traceback" not in outage, outage[-3000:]


def _served_names(port: int) -> set[str]:
    """The DNS names of the certificate served on 127.0.0.1:``port`` (a fresh handshake)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading what is served
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return set(sans.value.get_values_for_type(x509.DNSName))


def test_a_control_plane_added_with_advertise_is_named_by_api_and_cm(ha: HaCluster) -> None:
    """A third control plane registers its --advertise name; the leader re-issues api and cm
    (a normal rollout) and every control plane then serves an api certificate naming it."""
    _settled(ha)
    alias = "cp-c.clustercert.test"
    assert alias not in _served_names(ha.planes.ports["cp-a"])
    ha.planes.start("cp-c", None, "--advertise", alias)
    try:
        for name in ("cp-a", "cp-b", "cp-c"):
            port = ha.planes.ports[name]
            wait_until(lambda port=port: alias in _served_names(port), timeout=90,
                       interval=0.5, what=f"{name}'s api certificate to name {alias}")  # fmt: skip
        with api(ha) as client:
            listed = client.get("/v1/cluster/certificates").json()
        for name in ("api", "cm"):
            assert alias in _san_names(listed[f"{name}_cert"]), name
        planes = _control_planes(ha)
        assert [alias] in [p["advertise"] for p in planes]
    finally:
        process = ha.planes.processes.pop("cp-c")
        process.terminate()
        process.wait(timeout=30)


def _san_names(pem: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(sans.value.get_values_for_type(x509.DNSName))
