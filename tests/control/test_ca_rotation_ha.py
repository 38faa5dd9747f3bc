"""The internal CA rotation on `clustercert demo --ha`: three nodes, each with an etcd member
served with ``ccs_internode_encryption`` (managed by the node's agent), two control planes on
that etcd, one of them the leader. All real processes.

The rotation is asked of the control plane that does NOT lead (the leader runs the phases).
Throughout, a poller checks every etcd member (/health on a new handshake and a store read on
a new connection, as the control planes are clients: their identity, DIR/etcd-ca.pem) and both
control planes' GET /v1/cluster/certificates. Afterwards everything internal is issued by the
new CA, every member is restarted (it then trusts only what its bundle holds, and every
connection to it is new) and an update goes through each control plane. Then a second rotation
loses its leader (SIGKILL while paused at the end of ``reissuing``) and the other one finishes.

The measured figures are printed (``-s`` shows them); no test asserts a duration.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from clusterkit import api, marker, proxy_body, wait_until
from conftest import ADMIN_PASSWORD, start_cluster
from cryptography import x509

from clustercert import etcdmember, pki
from clustercert.control.faults import FAULT_ENV
from clustercert.demo import DemoCluster
from clustercert.errors import StoreError
from clustercert.store import EtcdStore, EtcdTLS

pytestmark = pytest.mark.cluster

ROTATION_WAIT = 300.0  # bounds every wait for a rotation; generous for a loaded machine
CCS = "ccs_internode_encryption"


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory, 3, ha=True)
    yield running
    running.stop()


# --- the control planes ----------------------------------------------------------------------


def _ports(cluster: DemoCluster) -> list[int]:
    """The API port of each control plane: the first, then the second."""
    return [cluster.api_port, *(port for port, _ in cluster.more_servers)]


def _view(cluster: DemoCluster, port: int) -> DemoCluster:
    """The cluster as seen through the control plane at ``port``."""
    return DemoCluster(cluster.directory, api_port=port, admin_password=ADMIN_PASSWORD)


def _process(cluster: DemoCluster, port: int) -> subprocess.Popen[bytes]:
    if port == cluster.api_port:
        assert cluster.server is not None
        return cluster.server
    (process,) = [p for api_port, p in cluster.more_servers if api_port == port]
    return process


def _leader_port(cluster: DemoCluster, asking: int) -> int | None:
    """The API port of the live leader as the control plane at ``asking`` sees it."""
    try:
        with api(_view(cluster, asking)) as client:
            answer = client.get("/v1/cluster/control_planes")
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    leaders = [p for p in answer.json()["control_planes"] if p["leader"] and p["alive"]]
    return int(leaders[0]["name"].rpartition(":")[2]) if len(leaders) == 1 else None


def _settled_leader(cluster: DemoCluster, among: list[int]) -> int:
    """Wait until every control plane in ``among`` names the same leader; return its port."""

    def agreed() -> int | None:
        seen = {_leader_port(cluster, port) for port in among}
        return seen.pop() if len(seen) == 1 and None not in seen else None

    leader: int = wait_until(agreed, timeout=90, interval=0.5, what="one leader")
    return leader


def _restart_plane(cluster: DemoCluster, port: int, fault: str | None = None) -> None:
    """Stop the control plane at ``port`` (SIGTERM) and start it again on the same port,
    with ``fault`` (CLUSTERCERT_FAULT) armed."""
    process = _process(cluster, port)
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)
    saved = os.environ.pop(FAULT_ENV, None)
    try:
        if fault:
            os.environ[FAULT_ENV] = fault
        if port == cluster.api_port:
            cluster.start_server()
        else:
            cluster.more_servers = [
                (p, cluster.spawn_second_server(port) if p == port else other)
                for p, other in cluster.more_servers
            ]
    finally:
        os.environ.pop(FAULT_ENV, None)
        if saved is not None:
            os.environ[FAULT_ENV] = saved
    _view(cluster, port).wait_for_api(60)


def _ca(cluster: DemoCluster, port: int) -> dict[str, Any]:
    with api(_view(cluster, port)) as client:  # new client: the API certificate changes
        answer = client.get("/v1/cluster/ca")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_done(cluster: DemoCluster, port: int, rotation: int) -> dict[str, Any]:
    phases: list[str] = []

    def done() -> dict[str, Any] | None:
        try:
            state = _ca(cluster, port)
        except (httpx.HTTPError, AssertionError):
            return None
        if not phases or phases[-1] != state["state"]:
            phases.append(state["state"])
        return state if state["rotation"] == rotation and state["phase"] == "done" else None

    result: dict[str, Any] = wait_until(done, ROTATION_WAIT, 0.5, "the rotation to finish")
    print(f"  states seen through :{port}: {' -> '.join(phases)}")
    return result


# --- what a client of the store sees -----------------------------------------------------------


def _store_context(cluster: DemoCluster, roots: Path | None = None) -> ssl.SSLContext:
    """A client of etcd as a control plane is one now: its identity (DIR/control-plane/), and
    DIR/etcd-ca.pem (or ``roots``). The pair may be rewritten this instant: retried."""
    directory = cluster.cluster
    for _ in range(40):
        try:
            return etcdmember.client_context(
                roots or directory.etcd_ca_file, directory.identity_cert, directory.identity_key
            )
        except (ssl.SSLError, OSError):
            time.sleep(0.05)
    raise AssertionError("the control plane's identity files never matched")


@dataclass
class Poller:
    """Until stopped, every ~0.1 s: per member, /health on a new handshake and a store read on
    a new connection; per control plane in ``planes``, GET /v1/cluster/certificates on a new
    connection trusting DIR/ca.pem. Each poll is one sample."""

    cluster: DemoCluster
    planes: list[int]
    samples: list[tuple[frozenset[str], frozenset[str], frozenset[int]]] = field(
        default_factory=list
    )
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _plane_answers(self, port: int) -> bool:
        try:
            with api(_view(self.cluster, port)) as client:
                client.timeout = httpx.Timeout(15)
                answer = client.get("/v1/cluster/certificates")
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            self.failures.append(f":{port}: {type(exc).__name__}: {exc}")
            return False
        if answer.status_code != 200:
            self.failures.append(f":{port}: {answer.status_code} {answer.text[:200]}")
        return answer.status_code == 200

    def _member(self, member: etcdmember.MemberSpec, context: ssl.SSLContext) -> tuple[bool, bool]:
        reason = etcdmember.health(member.client_url, context)
        if reason is not None:
            self.failures.append(reason)
        directory = self.cluster.cluster
        tls = EtcdTLS(directory.etcd_ca_file, directory.identity_cert, directory.identity_key)
        read = False
        try:
            store = EtcdStore(member.client_url, prefix="clustercert", tls=tls, timeout=2)
            try:
                read = store.get("meta/cluster") is not None
            finally:
                store.close()
        except StoreError as exc:
            self.failures.append(f"{member.name} read: {exc}")
        return reason is None, read

    def run(self) -> None:
        for _ in range(20000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            context = _store_context(self.cluster)
            # Every member at once: a sample is one moment (the members restart one right
            # after the other; probed in turn, two of them could each be seen down).
            with ThreadPoolExecutor(len(self.cluster.members)) as pool:
                results = list(pool.map(self._member, self.cluster.members, [context] * 3))
            names = [m.name for m in self.cluster.members]
            healthy = {n for n, (ok, _) in zip(names, results, strict=True) if ok}
            read = {n for n, (_, readable) in zip(names, results, strict=True) if readable}
            answered = {p for p in self.planes if self._plane_answers(p)}
            self.samples.append((frozenset(healthy), frozenset(read), frozenset(answered)))
            self.failures.append(f"--- sample {len(self.samples)}: {time.strftime('%H:%M:%S')}")
            time.sleep(0.1)

    def check(self) -> None:
        """Every sample: a majority of members healthy and readable, every plane answered."""
        assert len(self.samples) > 10
        planes = set(self.planes)
        bad = [s for s in self.samples if len(s[0]) < 2 or len(s[1]) < 2 or s[2] != planes]
        if bad:
            print("\n".join(self.failures))
        assert not bad, bad[:5]


class Polling:
    def __init__(self, cluster: DemoCluster, planes: list[int]) -> None:
        self.poller = Poller(cluster, planes)
        self.thread = threading.Thread(target=self.poller.run, daemon=True)

    def __enter__(self) -> Poller:
        self.thread.start()
        wait_until(lambda: len(self.poller.samples) >= 2, 60, 0.1, "the poller's first samples")
        return self.poller

    def __exit__(self, *exc: object) -> None:
        self.poller.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


# --- what is issued and served -----------------------------------------------------------------


def _fp(cert: x509.Certificate) -> str:
    return pki.fingerprint_sha256(cert)


def _handshake(address: tuple[str, int], context: ssl.SSLContext) -> str:
    """SHA-256 of the leaf served at ``address``, verified by ``context`` (no name check)."""
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _only_new_ca(cluster: DemoCluster, new_ca_file: Path) -> ssl.SSLContext:
    context = _store_context(cluster, new_ca_file)
    context.check_hostname = False  # the members are reached by 127.0.0.1
    return context


def _check_issued_by(cluster: DemoCluster, new_ca: x509.Certificate) -> None:
    """Every node's identity and CA file, every internal certificate (desired, proven on every
    node through both control planes), and ccs on every member's client and peer port."""
    new_fp = _fp(new_ca)
    for node in cluster.nodes:
        identity = node.directory / "identity"
        cas = x509.load_pem_x509_certificates((identity / "ca.pem").read_bytes())
        assert [_fp(c) for c in cas] == [new_fp], node.name
        leaf = x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes())
        assert leaf.issuer == new_ca.subject, node.name
        leaf.verify_directly_issued_by(new_ca)
    own = x509.load_pem_x509_certificate(cluster.cluster.identity_cert.read_bytes())
    own.verify_directly_issued_by(new_ca)

    def everyone_in_sync() -> bool:
        for port in _ports(cluster):
            with api(_view(cluster, port)) as client:
                if not all(n["in_sync"] for n in client.get("/v1/nodes").json()):
                    return False
        return True

    wait_until(everyone_in_sync, ROTATION_WAIT, 0.5, "every node in sync on both planes")
    with api(cluster) as client:
        listed = client.get("/v1/cluster/certificates").json()
        names = [k[: -len("_cert")] for k in listed if k.endswith("_cert")]
        details = {n: client.get(f"/v1/cluster/certificates/{n}").json() for n in names}
    internal = [n for n, d in details.items() if d["source"] == "internal"]
    assert CCS in internal and "api" in internal
    for name in internal:
        leaf = x509.load_pem_x509_certificates(listed[f"{name}_cert"].encode())[0]
        leaf.verify_directly_issued_by(new_ca)
    expected = details[CCS]["fingerprint_sha256"]
    context = _only_new_ca(cluster, cluster.cluster.ca_file)
    for member in cluster.members:
        assert _handshake(member.client_address, context) == expected, member.name
        assert _handshake(member.peer_address, context) == expected, member.name


def _restart_every_member(cluster: DemoCluster) -> list[float]:
    """One at a time: each member restarts (it loads only what its trusted CA file holds now,
    and every connection to it is new) and the cluster is healthy through every member again.
    Returns the seconds each took."""
    seconds = []
    for member in cluster.members:
        started = time.monotonic()
        etcdmember.stop(member)
        etcdmember.start(member)
        wait_until(
            lambda: all(
                etcdmember.health(m.client_url, _store_context(cluster)) is None
                for m in cluster.members
            ),
            timeout=90, interval=0.2, what=f"every member healthy after {member.name} restarted",
        )  # fmt: skip
        seconds.append(time.monotonic() - started)
    return seconds


def _update_through(cluster: DemoCluster, port: int) -> None:
    """An update through the control plane at ``port`` answers 200. From an operator's own CA:
    one from the internal CA would hold the next rotation in ``retiring`` until replaced."""
    body, fingerprint = proxy_body()
    with api(_view(cluster, port)) as client:
        answer = client.put("/v1/cluster/update_cert", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["fingerprint_sha256"] == fingerprint


def _member_restarts(cluster: DemoCluster) -> list[str]:
    """What the agents logged of their members' restarts (to trust a new root)."""
    found = []
    for node in cluster.nodes:
        log = cluster.directory / "logs" / f"{node.name}.log"
        if log.exists():
            found += re.findall(r"etcd member \S+ restarted to trust .*", log.read_text())
    return found


# --- the tests ---------------------------------------------------------------------------------


def test_a_rotation_asked_of_the_follower_keeps_the_store_and_both_planes_up(
    ha: DemoCluster,
) -> None:
    planes = _ports(ha)
    leader = _settled_leader(ha, planes)
    (follower,) = [p for p in planes if p != leader]
    old_ca = ha.cluster.ca().cert
    restarts_before = len(_member_restarts(ha))
    with Polling(ha, planes) as poller:
        started_at = time.monotonic()
        with api(_view(ha, follower)) as client:
            started = client.post("/v1/cluster/ca/rotate")
        assert started.status_code == 202, started.text
        rotation = started.json()["rotation"]
        state = _wait_done(ha, follower, rotation)
        took = time.monotonic() - started_at
    print(
        f"\n  rotation through the follower: {took:.1f} s, phases began "
        f"{state['phase_started']}, {state['rollouts']} rollout(s), "
        f"{len(poller.samples)} samples"
    )
    for line in _member_restarts(ha)[restarts_before:]:
        print(f"  {line}")
    poller.check()
    assert _leader_port(ha, follower) == leader  # the leader ran it throughout
    new_ca = x509.load_pem_x509_certificates(ha.cluster.ca_file.read_bytes())
    assert [_fp(c) for c in new_ca] == [state["fingerprint"]] != [_fp(old_ca)]
    assert _ca(ha, leader)["trusted"] == [state["fingerprint"]]
    _check_issued_by(ha, new_ca[0])
    # Fresh connections everywhere: each member restarted (now trusting only what its file
    # holds: the new CA), then both control planes reach the store and update through it.
    print(f"  every member restarted in turn: {[f'{s:.1f}' for s in _restart_every_member(ha)]} s")
    for port in planes:
        _update_through(ha, port)


def test_the_leader_killed_mid_rotation_the_other_control_plane_finishes_it(
    ha: DemoCluster,
) -> None:
    planes = _ports(ha)
    leader = _settled_leader(ha, planes)
    (follower,) = [p for p in planes if p != leader]
    # Make the armed process the leader: restart the follower with the pause armed, then
    # restart the leader (it hands over on the way down and follows when back).
    _restart_plane(ha, follower, fault="pause:ca_reissuing")
    _restart_plane(ha, leader)
    armed, other = follower, leader
    assert _settled_leader(ha, planes) == armed
    paused = marker(ha, "ca_reissuing")
    with Polling(ha, [other]) as poller:
        with api(_view(ha, other)) as client:
            started = client.post("/v1/cluster/ca/rotate")
        assert started.status_code == 202, started.text
        rotation = started.json()["rotation"]
        wait_until(paused.exists, ROTATION_WAIT, 0.2, "the leader to pause at ca_reissuing")
        pid = int(paused.read_text().split()[0])
        assert pid == _process(ha, armed).pid
        assert _ca(ha, other)["phase"] == "reissuing"
        killed_at = time.monotonic()
        _process(ha, armed).send_signal(signal.SIGKILL)
        _process(ha, armed).wait(timeout=30)
        wait_until(lambda: _leader_port(ha, other) == other, 90, 0.2, "the other plane to lead")
        took_over = time.monotonic() - killed_at
        state = _wait_done(ha, other, rotation)
        finished = time.monotonic() - killed_at
    print(
        f"\n  leader SIGKILLed paused at the end of reissuing: the other led after "
        f"{took_over:.1f} s, the rotation was done {finished:.1f} s after the kill; phases "
        f"began {state['phase_started']}, {state['rollouts']} rollout(s)"
    )
    poller.check()
    paused.unlink(missing_ok=True)
    new_ca = x509.load_pem_x509_certificates(ha.cluster.ca_file.read_bytes())
    assert [_fp(c) for c in new_ca] == [state["fingerprint"]]
    # The killed one comes back (without the fault) and follows the finished rotation.
    _restart_plane(ha, armed)
    assert _ca(ha, armed)["phase"] == "done"
    _check_issued_by(ha, new_ca[0])
    for port in planes:
        _update_through(ha, port)
