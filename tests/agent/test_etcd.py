"""ccs_internode_encryption secures the store itself: a 3-member etcd over TLS (one member per
node, its files managed by the node's agent) under two control planes, all real processes.

While a rotation runs, a poller checks etcd through every member: /health on a new connection
each time (so each poll is a fresh handshake) and a store read."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from certfactory import CA
from clusterkit import api, served_fingerprint, wait_until
from conftest import start_cluster

from clustercert import etcdmember
from clustercert.demo import DemoCluster
from clustercert.errors import StoreError
from clustercert.store import EtcdStore, EtcdTLS

pytestmark = pytest.mark.cluster

NAME = "ccs_internode_encryption"


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory, 3, ha=True)
    yield running
    running.stop()


def _served(cluster: DemoCluster) -> dict[str, tuple[str, str]]:
    """What each member serves on its client and its peer port, by handshake."""
    return {
        m.name: (served_fingerprint(*m.client_address), served_fingerprint(*m.peer_address))
        for m in cluster.members
    }


def _record(cluster: DemoCluster) -> dict[str, object]:
    with api(cluster) as client:
        answer: dict[str, object] = client.get(f"/v1/cluster/certificates/{NAME}").json()
        return answer


def _client_context(cluster: DemoCluster, roots_pem: str) -> ssl.SSLContext:
    """A client of etcd as the control plane is one: its identity, trusting ``roots_pem``."""
    context = ssl.create_default_context(cadata=roots_pem)
    context.load_cert_chain(cluster.cluster.identity_cert, cluster.cluster.identity_key)
    return context


def _status(cluster: DemoCluster, agent_url: str) -> dict[str, object]:
    """An agent's internal status, asked as the control plane asks it (its identity)."""
    context = _client_context(cluster, cluster.cluster.ca_file.read_text())
    with httpx.Client(base_url=agent_url, verify=context, timeout=10) as client:
        answer = client.get("/internal/status")
    assert answer.status_code == 200, answer.text
    status: dict[str, object] = answer.json()
    return status


@dataclass
class Poller:
    """Polls every member until stopped: per poll, which members answered /health healthy
    and through which a store read succeeded; and whether a read through a store naming every
    member (what a control plane does) succeeded (``cluster_reads``)."""

    cluster: DemoCluster
    ca_file: Path
    samples: list[tuple[frozenset[str], frozenset[str]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cluster_reads: list[bool] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        directory = self.cluster.cluster
        tls = EtcdTLS(self.ca_file, directory.identity_cert, directory.identity_key)
        stores = {
            m.name: EtcdStore(m.client_url, prefix="clustercert", tls=tls, timeout=2)
            for m in self.cluster.members
        }
        every = EtcdStore(
            [m.client_url for m in self.cluster.members], prefix="clustercert", tls=tls, timeout=2
        )
        context = _client_context(self.cluster, self.ca_file.read_text())
        try:
            for _ in range(5000):  # bounded; stopped long before
                if self.stop.is_set():
                    return
                healthy, read = set(), set()
                for member in self.cluster.members:
                    reason = etcdmember.health(member.client_url, context)
                    if reason is None:
                        healthy.add(member.name)
                    else:
                        self.failures.append(reason)
                    try:
                        if stores[member.name].get("meta/cluster") is not None:
                            read.add(member.name)
                    except StoreError as exc:
                        self.failures.append(str(exc))
                self.samples.append((frozenset(healthy), frozenset(read)))
                try:
                    self.cluster_reads.append(every.get("meta/cluster") is not None)
                except StoreError as exc:
                    self.failures.append(f"through every member: {exc}")
                    self.cluster_reads.append(False)
                time.sleep(0.02)
        finally:
            for store in [*stores.values(), every]:
                store.close()


def _polling(cluster: DemoCluster, ca_file: Path) -> tuple[Poller, threading.Thread]:
    poller = Poller(cluster, ca_file)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    wait_until(lambda: len(poller.samples) >= 3, timeout=30, what="the poller's first samples")
    return poller, thread


def _stop_polling(poller: Poller, thread: threading.Thread) -> None:
    poller.stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()


def _healthy_through_every_member(cluster: DemoCluster, roots_pem: str) -> bool:
    context = _client_context(cluster, roots_pem)
    return all(etcdmember.health(m.client_url, context) is None for m in cluster.members)


def _restart_one_member_and_rejoin(cluster: DemoCluster, roots_pem: str) -> None:
    """A forced reconnect: node-2's member restarts; its peers' links to it are new
    handshakes with the new certificates on both sides, and it must rejoin."""
    member = cluster.members[1]
    etcdmember.stop(member)
    etcdmember.start(member)
    wait_until(
        lambda: _healthy_through_every_member(cluster, roots_pem),
        timeout=60, what="every member healthy after node-2's member restarted",
    )  # fmt: skip


def test_a_ccs_certificate_without_client_auth_is_rejected_and_nothing_changes(
    ha: DemoCluster,
) -> None:
    before_record, before_served = _record(ha), _served(ha)
    pids = [etcdmember.running_pid(m) for m in ha.members]
    before_trust = ha.cluster.etcd_ca_file.read_bytes()
    leaf = CA.new().issue("ccs.example", sans=["127.0.0.1"], eku=["serverAuth"])
    body = {"name": NAME, "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    with api(ha) as client:
        answer = client.put("/v1/cluster/update_cert", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error_code"] == "missing_extended_key_usage"
    assert "clientAuth" in error["description"]
    assert _record(ha) == before_record
    assert _served(ha) == before_served
    assert [etcdmember.running_pid(m) for m in ha.members] == pids  # no member restarted
    assert ha.cluster.etcd_ca_file.read_bytes() == before_trust


def test_a_rotation_within_the_internal_ca_keeps_every_member_healthy(ha: DemoCluster) -> None:
    internal = ha.cluster.ca_file
    poller, thread = _polling(ha, internal)
    try:
        with api(ha) as client:
            answer = client.post("/v1/cluster/certificates/rotate", json={"name": NAME})
    finally:
        _stop_polling(poller, thread)
    assert answer.status_code == 200, answer.text
    expected = _record(ha)["fingerprint_sha256"]
    assert set(_served(ha).values()) == {(expected, expected)}
    # No member restarted: every member answered every poll, and served the store.
    everyone = frozenset(m.name for m in ha.members)
    assert poller.samples and all(s == (everyone, everyone) for s in poller.samples), (
        poller.failures[:5]
    )
    _restart_one_member_and_rejoin(ha, internal.read_text())


def test_a_rotation_to_a_new_ca_trusts_first_and_keeps_a_quorum(ha: DemoCluster) -> None:
    """The new root goes into every member's trusted CA file first (each member restarts to
    load it, one at a time), then every member switches; the store keeps a quorum and
    answers throughout, and both control planes reach it afterwards."""
    # Each node says it runs a member, so the new root is pinned one node at a time.
    assert all(_status(ha, n.agent_url)["etcd_member"] is True for n in ha.nodes)
    new_ca = CA.new()
    leaf = new_ca.issue(
        "ccs.cluster.local",
        sans=["cluster.local", "localhost", "127.0.0.1"],
        eku=["serverAuth", "clientAuth"],
    )
    roots = ha.cluster.ca_file.read_text() + new_ca.cert_pem
    poller_ca = ha.directory / "poller-ca.pem"
    poller_ca.write_text(roots)
    poller, thread = _polling(ha, poller_ca)
    body = {"name": NAME, "certificate": leaf.full_chain_pem, "key": leaf.key_pem}
    try:
        with api(ha) as client:
            answer = client.put("/v1/cluster/update_cert", json=body)
    finally:
        _stop_polling(poller, thread)
    assert answer.status_code == 200, answer.text
    assert answer.json()["fingerprint_sha256"] == leaf.fingerprint
    assert set(_served(ha).values()) == {(leaf.fingerprint, leaf.fingerprint)}
    # A client trusting only the new root (and presenting the control plane's identity)
    # verifies every member and finds it healthy.
    assert _healthy_through_every_member(ha, new_ca.cert_pem)
    # Throughout: a majority healthy, and the store read through at least a majority.
    # A poll checks the members one after the other, so one poll can see two members down in
    # turn (each restart takes about 0.3 s); what must hold at every instant is what a client
    # naming every member sees: the store answered every read (and no poll found every member
    # down).
    assert poller.samples and all(poller.cluster_reads), poller.failures[:5]
    assert all(h for h, _ in poller.samples), poller.failures[:5]
    # The control planes trust the new root for the store (DIR/etcd-ca.pem followed).
    assert new_ca.cert_pem.strip() in ha.cluster.etcd_ca_file.read_text()
    _every_control_plane_shows(ha, leaf.fingerprint)
    # node-2's member is the second control plane's store: after its restart that control
    # plane's connections are new handshakes with the member's new certificate.
    _restart_one_member_and_rejoin(ha, roots)
    wait_until(
        lambda: _every_control_plane_shows(ha, leaf.fingerprint, strict=False),
        timeout=30, what="both control planes reading the store again",
    )  # fmt: skip


def _every_control_plane_shows(ha: DemoCluster, fingerprint: str, strict: bool = True) -> bool:
    for url in [ha.api_url, *(f"https://127.0.0.1:{port}" for port, _ in ha.more_servers)]:
        with httpx.Client(
            base_url=url,
            auth=("admin@cluster.local", ha.admin_password or ""),
            verify=ssl.create_default_context(cafile=str(ha.cluster.ca_file)),
            timeout=30,
        ) as client:
            answer = client.get(f"/v1/cluster/certificates/{NAME}")
            if not strict and answer.status_code != 200:
                return False
            assert answer.status_code == 200, answer.text
            assert answer.json()["fingerprint_sha256"] == fingerprint
    return True
