"""The parts of the etcd member's handling that need no process: the agent's configuration of
an etcd service, the control plane's store CA file, and opening an etcd store over HTTPS."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from certfactory import CA

from clustercert.agent.config import load_agent_config
from clustercert.control.state import ClusterState, RolloutRecord
from clustercert.control.storetrust import StoreTrustFile, write_store_trust
from clustercert.errors import ConfigError
from clustercert.sealing import KeySealer
from clustercert.store import EtcdStore, EtcdTLS, SqliteStore, open_store

MEMBER = """
[[services]]
type = "etcd"
member_name = "node-1"
member_dir = "/var/lib/clustercert/etcd"
client_url = "https://10.0.0.11:2379"
peer_url = "https://10.0.0.11:2380"
initial_cluster = "node-1=https://10.0.0.11:2380,node-2=https://10.0.0.12:2380"
"""


def _config(tmp_path: Path, service: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        'name = "n"\ndata_dir = "/tmp/x"\nlisten = "127.0.0.1:1"\n'
        'control_plane_url = "https://127.0.0.1:2"\n' + service
    )
    return path


def test_an_etcd_service_serves_ccs_on_its_client_url_and_is_supervised(tmp_path: Path) -> None:
    (service,) = load_agent_config(_config(tmp_path, MEMBER)).services
    assert service.certificate == "ccs_internode_encryption"
    assert service.address == ("10.0.0.11", 2379)
    assert service.supervise is True
    assert service.etcd is not None
    assert service.etcd.peer_address == ("10.0.0.11", 2380)
    assert service.etcd.cert_file == Path("/var/lib/clustercert/etcd/tls/current/cert.pem")
    argv = service.etcd.argv()
    assert argv[0] == "etcd"
    for flag in ("--client-cert-auth", "--peer-client-cert-auth"):
        assert flag in argv
    assert argv[argv.index("--trusted-ca-file") + 1] == "/var/lib/clustercert/etcd/ca.pem"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("member_dir = ", "member_dirx = "), r"services\[0\]\.member_dir: missing"),
        (("https://10.0.0.11:2379", "http://10.0.0.11:2379"), r"client_url: expected https://"),
        (("node-1=https://10.0.0.11:2380,", ""), r"initial_cluster: must list this member"),
        (('type = "etcd"', 'type = "etcd"\ncertificate = "proxy"'), "serves ccs_internode"),
        (('type = "etcd"', 'type = "etcd"\ncommand = "restart"'), "command: a list of strings"),
    ],
)
def test_a_bad_etcd_service_names_the_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_agent_config(_config(tmp_path, MEMBER.replace(*change)))


def test_the_store_ca_file_is_the_internal_ca_and_the_pinned_roots(tmp_path: Path) -> None:
    internal, pinned = CA.new(), CA.new()
    path = tmp_path / "etcd-ca.pem"
    assert write_store_trust(path, internal.cert_pem, [])
    assert not write_store_trust(path, internal.cert_pem, [])  # the same: not written again
    assert write_store_trust(path, internal.cert_pem, [pinned.cert_pem])
    text = path.read_text()
    assert internal.cert_pem.strip() in text and pinned.cert_pem.strip() in text
    assert path.stat().st_mode & 0o777 == 0o644


def test_etcd_over_https_needs_tls_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HTTPS to etcd needs a CA and a client certificate"):
        open_store("etcd+https://127.0.0.1:2379/c")
    ca = CA.new()
    leaf = ca.issue("cp", sans=["127.0.0.1"], eku=["clientAuth"])
    cert, key = leaf.write(tmp_path)
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    store = open_store("etcd+https://127.0.0.1:2379/c", EtcdTLS(tmp_path / "ca.pem", cert, key))
    try:
        assert isinstance(store, EtcdStore) and store.uses_tls
        assert "https://127.0.0.1:2379" in repr(store)
    finally:
        store.close()
    plain = open_store("etcd://127.0.0.1:2379/c", EtcdTLS(tmp_path / "ca.pem", cert, key))
    try:
        assert isinstance(plain, EtcdStore) and not plain.uses_tls  # etcd:// stays plain
    finally:
        plain.close()


def test_the_store_ca_file_follows_the_record_and_a_rollout_adding_roots(
    tmp_path: Path,
) -> None:
    """Another control plane's rollout in phase a: its new root is trusted for the store
    before the rollout stages anything; once it ends, the file holds the recorded roots."""
    internal, recorded, adding = CA.new(), CA.new(), CA.new()
    state = ClusterState(SqliteStore(tmp_path / "store.db"), KeySealer(os.urandom(32)))
    path = tmp_path / "etcd-ca.pem"
    internal_file = tmp_path / "ca.pem"
    internal_file.write_text(internal.cert_pem)
    follower = StoreTrustFile(path, internal_file, state)

    async def scenario() -> None:
        await state.put_trust([recorded.cert_pem], 0)
        await follower.refresh()
        assert recorded.cert_pem.strip() in path.read_text()
        assert adding.cert_pem.strip() not in path.read_text()
        record = RolloutRecord(
            rollout_id="r1", phase="trusting", generations={}, fingerprints={}, previous={},
            actor="admin", owner="cp-2", started_at="2026-01-01T00:00:00Z",
            trust_added=[adding.cert_pem],
        )  # fmt: skip
        begun = await state.begin_rollout(record)
        await follower.refresh()
        assert adding.cert_pem.strip() in path.read_text()
        await state.end_rollout(begun)
        await follower.refresh()
        assert adding.cert_pem.strip() not in path.read_text()
        assert internal.cert_pem.strip() in path.read_text()
        # The internal CA rotates: the directory's ca.pem holds old and new, and so does this.
        rotated = CA.new()
        internal_file.write_text(internal.cert_pem + rotated.cert_pem)
        await follower.refresh()
        assert rotated.cert_pem.strip() in path.read_text()

    try:
        asyncio.run(scenario())
    finally:
        state.store.close()
