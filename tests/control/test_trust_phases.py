"""Trust phases (DESIGN §13): a rollout whose certificate chains to a root some node does not
trust yet (a) pins that root in every node's redis trust bundle, proven, before anything is
staged; (b) switches the certificates; (c) retires the old root once no certificate in the
cluster chains to it. A phase that cannot complete changes nothing that could break a link.

Real control plane, agents and replicated redis-servers; the control plane's test-only fault
seam pauses a rollout between phases so the test can look at every node at that moment.
Phase costs and relink times are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import statistics
import time
from collections.abc import Iterator

import pytest
from certfactory import CA
from clusterkit import (
    api,
    fingerprint,
    leaf_for,
    link_up,
    marker,
    prove_replication,
    put,
    redis_admin,
    restart_server,
    served_by_node,
    trusted_by,
    wait_until,
)
from conftest import start_cluster
from cryptography import x509

from clustercert.demo import DemoCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def phased(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    running = start_cluster(tmp_path_factory)
    yield running
    running.stop()


def _body(name: str, ca: CA) -> dict[str, str]:
    leaf = leaf_for(ca, name)
    return {"name": name, "certificate": leaf.full_chain_pem, "key": leaf.key_pem}


def _generation(cluster: DemoCluster, name: str) -> int:
    with api(cluster) as client:
        generation: int = client.get(f"/v1/cluster/certificates/{name}").json()["generation"]
    return generation


def _on_disk(cluster: DemoCluster, name: str) -> dict[str, list[str]]:
    """The generation directories of ``name`` on every node."""
    return {
        n.name: sorted(p.name for p in (n.directory / "certs" / name).iterdir() if p.is_dir())
        for n in cluster.nodes
    }


def _phase_log(cluster: DemoCluster) -> str:
    return (cluster.directory / "logs" / "server.log").read_text()


def test_a_new_root_is_trusted_everywhere_before_any_node_switches(phased: DemoCluster) -> None:
    cluster = phased
    x, y = CA.new(), CA.new()
    internal = fingerprint(x509.load_pem_x509_certificate(cluster.cluster.ca_file.read_bytes()))
    assert all(fingerprint(x.cert) not in trusted_by(n) for n in cluster.nodes)
    before = served_by_node(cluster)
    generation = _generation(cluster, "proxy")
    paused = marker(cluster, "after_trust")
    paused.unlink(missing_ok=True)
    restart_server(cluster, fault="pause:after_trust")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(put, cluster, _body("proxy", x))
            wait_until(paused.exists, timeout=60, what="the rollout to pause after phase a")
            # Phase a done: every bundle trusts X, and no node staged or switched anything.
            assert all(fingerprint(x.cert) in trusted_by(n) for n in cluster.nodes)
            assert served_by_node(cluster) == before
            assert _generation(cluster, "proxy") == generation
            paused.unlink()
            response = answer.result(timeout=60)
        assert response.status_code == 200, response.text
    finally:
        paused.unlink(missing_ok=True)
        restart_server(cluster)
    assert set(served_by_node(cluster).values()) == {response.json()["fingerprint_sha256"]}
    prove_replication(cluster, "phase-b")

    # Both link names move to Y in one update: nothing chains to X any more, so X is retired
    # from every bundle; Y stays; the internal CA is always there.
    batch = {"certificates": [_body("proxy", y), _body("data_internode_encryption", y)]}
    with api(cluster) as client:
        response = client.put("/v1/cluster/certificates", json=batch)
    assert response.status_code == 200, response.text
    for node in cluster.nodes:
        trusted = trusted_by(node)
        assert fingerprint(y.cert) in trusted and internal in trusted
        assert fingerprint(x.cert) not in trusted, node.name
    prove_replication(cluster, "phase-c")
    assert re.search(r"trust: retired [0-9a-f]{16}", _phase_log(cluster))


def test_a_node_that_cannot_trust_the_root_stops_the_rollout_before_staging(
    phased: DemoCluster,
) -> None:
    cluster = phased
    refusing = cluster.nodes[1]
    z = CA.new()
    before = served_by_node(cluster)
    generation = _generation(cluster, "proxy")
    disk = _on_disk(cluster, "proxy")
    bundles = {n.name: trusted_by(n) for n in cluster.nodes}
    admin = redis_admin(refusing)
    admin.execute_command("ACL", "SETUSER", "default", "-config|set")
    try:
        response = put(cluster, _body("proxy", z))
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+config|set")
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error_code"] == "nodes_not_updated"
    assert body["description"] == (
        "the update was aborted before staging: 1 of 3 nodes could not trust the new root "
        "(node-2); no node changed"
    )
    (failed,) = [n for n in body["nodes"] if not n["ok"]]
    assert failed["name"] == refusing.name and failed["step"] == "trust"
    assert "trust bundle was refused" in failed["error"] and "no permissions" in failed["error"]
    # Nothing changed: the desired generation, what every node serves, what is on disk, and
    # every bundle (the others had pinned Z; it was taken back).
    assert _generation(cluster, "proxy") == generation
    assert served_by_node(cluster) == before
    assert _on_disk(cluster, "proxy") == disk
    assert {n.name: trusted_by(n) for n in cluster.nodes} == bundles
    prove_replication(cluster, "refused")
    # Once the node accepts bundles again, the same update goes through.
    again = put(cluster, _body("proxy", z))
    assert again.status_code == 200, again.text
    assert all(fingerprint(z.cert) in trusted_by(n) for n in cluster.nodes)


def test_a_replica_killed_during_the_switch_converges(phased: DemoCluster) -> None:
    """SIGKILL a replica's redis while the rollout is paused between its decision and its
    commit: the others switch, the agent restarts that redis with the new files, it resyncs
    from the primary, and replication carries fresh writes to every replica."""
    cluster = phased
    victim = cluster.nodes[2]
    paused = marker(cluster, "after_decision")
    paused.unlink(missing_ok=True)
    restart_server(cluster, fault="pause:after_decision")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(put, cluster, _body("data_internode_encryption", CA.new()))
            wait_until(paused.exists, timeout=60, what="the rollout to pause after its decision")
            pid = victim.redis_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            paused.unlink()
            response = answer.result(timeout=60)
        assert response.status_code in (200, 409), response.text
    finally:
        paused.unlink(missing_ok=True)
        restart_server(cluster)
    cluster.wait_in_sync(60)
    assert victim.redis_pid != pid
    wait_until(lambda: link_up(victim), timeout=15, what="the restarted replica to link")
    prove_replication(cluster, "after-kill")


def test_what_each_phase_costs(phased: DemoCluster) -> None:
    """Rotations of ``proxy`` within one CA (no trust phase) against rotations to a new CA
    each time (phase a pins it, phase c retires the one before): the difference is what the
    phases add. Printed, not asserted."""
    cluster = phased
    same = CA.new()
    assert put(cluster, _body("proxy", same)).status_code == 200  # pin `same` once
    timings: dict[str, list[float]] = {"same CA": [], "new CA": []}
    for _ in range(5):
        for kind in timings:
            ca = same if kind == "same CA" else CA.new()
            started = time.monotonic()
            response = put(cluster, _body("proxy", ca))
            timings[kind].append(time.monotonic() - started)
            assert response.status_code == 200, response.text
    log = _phase_log(cluster)
    added = [
        float(s) for s in re.findall(r"every node trusts \d+ new root\(s\) \(([\d.]+) s\)", log)
    ]
    retired = [float(s) for s in re.findall(r"retired \d+ root\(s\) in ([\d.]+) s", log)]
    print()
    for kind, values in timings.items():
        print(f"  proxy rotation, {kind}: median {statistics.median(values):.3f} s")
    print(f"  phase a (pin and prove on 3 nodes): median {statistics.median(added):.3f} s")
    print(f"  phase c (retire on 3 nodes): median {statistics.median(retired):.3f} s")
    assert added and retired
