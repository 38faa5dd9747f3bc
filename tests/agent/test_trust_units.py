"""In-process units: the agent's redis trust bundles (agent/trust.py), which roots the control
plane pins and retires (control/trust.py), and the replication keys of the agent configuration.
No process is started; the real-process proofs are test_replication.py and
test_trust_phases.py."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from certfactory import CA
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from clustercert.agent.config import load_agent_config
from clustercert.agent.trust import PinnedRoots, TrustBundles, chain_roots
from clustercert.control.trust import chain_root, roots_to_add, roots_to_retire
from clustercert.errors import ConfigError
from clustercert.validation import TrustStore


def test_chain_roots_are_the_self_signed_members() -> None:
    root = CA.new()
    leaf = root.intermediate().issue("redis.example", sans=["redis.example"])
    chain = x509.load_pem_x509_certificates(leaf.full_chain_pem.encode())
    assert chain_roots(chain) == [root.cert]
    assert chain_roots(chain[:-1]) == []  # uploaded without its root: nothing to trust


def test_bundles_are_content_addressed_idempotent_and_public(tmp_path: Path) -> None:
    a, b = CA.new().cert, CA.new().cert
    bundles = TrustBundles(tmp_path / "trust")
    first, fingerprints = bundles.write([a, b, a])
    assert len(fingerprints) == 2  # duplicates dropped
    assert len(x509.load_pem_x509_certificates(first.read_bytes())) == 2
    again, _ = bundles.write([b, a])  # same set, other order: the same file
    assert again == first
    assert stat.S_IMODE(first.stat().st_mode) == 0o644
    other, _ = bundles.write([a])
    assert other != first and first.exists()


def test_bundles_written_within_one_clock_tick_are_pruned_oldest_first(tmp_path: Path) -> None:
    """File times come from the kernel's coarse clock: bundles written within one tick have
    equal mtimes (seen under load: the newer one was pruned). The order of writes decides."""
    bundles = TrustBundles(tmp_path / "trust", keep=3)
    paths = [bundles.write([CA.new().cert])[0] for _ in range(3)]
    tick = time.time_ns() + 10**9
    for path in paths:
        os.utime(path, ns=(tick, tick))
    bundles.keep = 2
    current, _ = bundles.write([CA.new().cert])
    left = {p.name for p in (tmp_path / "trust").iterdir()}
    assert left == {paths[1].name, paths[2].name, current.name}


def test_old_bundles_are_pruned_but_never_the_current_one(tmp_path: Path) -> None:
    bundles = TrustBundles(tmp_path / "trust", keep=2)
    paths = [bundles.write([CA.new().cert])[0] for _ in range(4)]
    assert sorted(p.name for p in (tmp_path / "trust").iterdir()) == sorted(
        p.name for p in paths[-2:]
    )


def test_pinned_roots_survive_a_restart_and_can_be_emptied(tmp_path: Path) -> None:
    a = CA.new().cert
    PinnedRoots(tmp_path).save([a, a])
    assert PinnedRoots(tmp_path).load() == [a]
    PinnedRoots(tmp_path).save([])
    assert PinnedRoots(tmp_path).load() == []
    assert PinnedRoots(tmp_path / "never-written").load() == []


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def test_the_root_of_a_chain_without_it_comes_from_the_anchors() -> None:
    root = CA.new()
    leaf = root.intermediate().issue("redis.example", sans=["redis.example"])
    assert chain_root(leaf.full_chain_pem, TrustStore.of([])) == root.cert
    assert chain_root(leaf.chain_pem, TrustStore.of([root.cert])) == root.cert
    assert chain_root(leaf.chain_pem, TrustStore.of([])) is None
    assert chain_root(leaf.chain_pem, TrustStore.of([CA.new().cert])) is None  # not its issuer


def test_roots_to_add_skip_the_pinned_and_the_internal_ca() -> None:
    internal, pinned, new = CA.new(), CA.new(), CA.new()
    chains = [ca.issue("r", sans=["r"]).full_chain_pem for ca in (internal, pinned, new, new)]
    added = roots_to_add(
        chains, {_fp(pinned.cert): pinned.cert}, TrustStore.of([]), [internal.cert]
    )
    assert added == {_fp(new.cert): new.cert}


def test_roots_to_retire_are_those_no_desired_chain_ends_in() -> None:
    old, kept = CA.new(), CA.new()
    pinned = {_fp(old.cert): old.cert, _fp(kept.cert): kept.cert}
    desired = [kept.issue("r", sans=["r"]).chain_pem]  # without its root: found as an anchor
    assert roots_to_retire(pinned, desired, TrustStore.of([kept.cert])) == {_fp(old.cert)}


def _config(tmp_path: Path, service: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        'name = "n"\ndata_dir = "/tmp/x"\nlisten = "127.0.0.1:1"\n'
        'control_plane_url = "https://127.0.0.1:2"\n\n[[services]]\ntype = "redis"\n'
        'socket = "/tmp/x/redis.sock"\naddress = "127.0.0.1:3"\n' + service
    )
    return path


def test_redis_defaults_to_data_internode_and_primary(tmp_path: Path) -> None:
    (service,) = load_agent_config(_config(tmp_path, "")).services
    assert service.certificate == "proxy"
    assert service.client_certificate == "data_internode_encryption"
    assert service.role == "primary"


def test_a_replica_names_its_primary(tmp_path: Path) -> None:
    config = _config(tmp_path, 'replicaof = "10.0.0.1:6380"\nclient_certificate = "syncer"\n')
    (service,) = load_agent_config(config).services
    assert service.replicaof == ("10.0.0.1", 6380)
    assert service.client_certificate == "syncer"
    assert service.role == "replica"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('client_certificate = "proxy"\n',
         r"services\[0\]\.client_certificate: expected data_internode_encryption .* got 'proxy'"),
        ('replicaof = "10.0.0.1"\n', r"services\[0\]\.replicaof: expected HOST:PORT"),
        ("replicaof = 6380\n", r"services\[0\]\.replicaof: a redis service's primary"),
        ('extra_ca_file = "/nonexistent/ca.pem"\n',
         r"services\[0\]\.extra_ca_file: /nonexistent/ca.pem is not a file"),
        ("cluster_port = 0\n", r"services\[0\]\.cluster_port: a redis service's cluster bus port"),
        ('cluster_port = 16380\nreplicaof = "10.0.0.1:6380"\n',
         r"services\[0\]\.replicaof: a Redis Cluster node \(cluster_port\) gets its primary"),
    ],
)  # fmt: skip
def test_bad_replication_keys_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_agent_config(_config(tmp_path, extra))
