"""A real etcd member over TLS, started by clustercert.etcdmember: what etcd 3.4 re-reads and
when, and the store client over HTTPS (store/etcd.py with EtcdTLS) following its files."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from certfactory import CA, Leaf
from clusterkit import served_fingerprint, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from store_fixtures import free_ports

from clustercert import etcdmember
from clustercert.agent.config import ServiceConfig
from clustercert.agent.etcd import EtcdService
from clustercert.agent.services import ReloadFailed
from clustercert.errors import StoreError
from clustercert.etcdmember import MemberSpec
from clustercert.store import EtcdStore, EtcdTLS

pytestmark = pytest.mark.cluster  # starts etcd itself

SANS = ["127.0.0.1", "localhost"]


def _pair(ca: CA, name: str = "ccs") -> Leaf:
    return ca.issue(name, sans=SANS, eku=["serverAuth", "clientAuth"])


def _write(directory: Path, leaf: Leaf) -> Path:
    directory.mkdir(mode=0o700, parents=True)
    (directory / "cert.pem").write_text(leaf.chain_pem)
    key = directory / "key.pem"
    key.touch(mode=0o600)
    key.write_text(leaf.key_pem)
    return directory


class Member:
    """One single-member etcd with TLS and the files to reach it."""

    def __init__(self, root: Path, ca: CA) -> None:
        client, peer = free_ports(2)
        self.root = root
        self.ca = ca
        self.spec = MemberSpec(
            name="m1",
            directory=root / "member",
            client_url=f"https://127.0.0.1:{client}",
            peer_url=f"https://127.0.0.1:{peer}",
            initial_cluster=f"m1=https://127.0.0.1:{peer}",
        )
        self.first = _pair(ca)
        self.first_root = ca.cert.fingerprint(hashes.SHA256()).hex()
        first = _write(root / "gen-1", self.first)
        etcdmember.write_bootstrap(self.spec, self.first.chain_pem, self.first.key_pem, ca.cert_pem)
        etcdmember.point_at(self.spec, first)
        self.client = _pair(ca, "control-plane")
        _write(root / "client", self.client)
        etcdmember.start(self.spec)
        assert etcdmember.wait_healthy(self.spec.client_url, self.context(), 30) is None

    def context(self, ca_pem: str | None = None, client: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=ca_pem or self.ca.cert_pem)
        directory = client or self.root / "client"
        context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        return context

    def served(self) -> tuple[str, str]:
        return (
            served_fingerprint(*self.spec.client_address),
            served_fingerprint(*self.spec.peer_address),
        )


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Member]:
    running = Member(tmp_path, CA.new())
    yield running
    etcdmember.stop(running.spec)


def test_a_symlink_swap_switches_both_ports_on_the_next_handshake(member: Member) -> None:
    """etcd re-reads cert and key on every handshake: one rename switches the pair; a
    connection already open keeps working (the store client's pool survives the switch)."""
    ca_file = member.root / "trusted.pem"
    ca_file.write_text(member.ca.cert_pem)
    client = member.root / "client"
    tls = EtcdTLS(ca_file, client / "cert.pem", client / "key.pem")
    with EtcdStore(member.spec.client_url, tls=tls) as store:
        store.put("before", "1")
        assert member.served() == (member.first.fingerprint, member.first.fingerprint)
        second = _pair(member.ca)
        etcdmember.point_at(member.spec, _write(member.root / "gen-2", second))
        assert member.served() == (second.fingerprint, second.fingerprint)
        store.put("after", "2")  # on the pooled connection
        assert store.get("before") is not None
    reason = etcdmember.health(member.spec.client_url, member.context())
    assert reason is None


def test_the_trusted_ca_file_is_read_only_at_start(member: Member) -> None:
    """A client from a new root is refused after the CA file gained that root, until the
    member restarts (why the agent restarts a member to trust a new root)."""
    other = CA.new()
    _write(member.root / "other-client", _pair(other, "other"))
    other_client = member.context(client=member.root / "other-client")
    refused = etcdmember.health(member.spec.client_url, other_client)
    assert refused is not None
    member.spec.ca_file.write_text(member.ca.cert_pem + other.cert_pem)
    assert etcdmember.health(member.spec.client_url, other_client) is not None  # still refused
    assert etcdmember.restart(member.spec, member.context(), 30) is None
    assert etcdmember.health(member.spec.client_url, other_client) is None


def test_the_store_client_follows_its_ca_file(member: Member) -> None:
    """The member switches to a certificate from a root the client does not trust: new
    connections fail with a StoreError; once the CA file gains the root, the same client
    reaches the store again (no restart, no new client)."""
    ca_file = member.root / "trusted.pem"
    ca_file.write_text(member.ca.cert_pem)
    client = member.root / "client"
    tls = EtcdTLS(ca_file, client / "cert.pem", client / "key.pem")
    other = CA.new()
    # The member trusts the control plane's client certificate (member.ca) in every case.
    with EtcdStore(member.spec.client_url, tls=tls, timeout=2) as store:
        store.put("k", "v")
        foreign = _pair(other)
        foreign_dir = _write(member.root / "foreign", foreign)
        foreign_dir.joinpath("cert.pem").write_text(foreign.full_chain_pem)
        etcdmember.point_at(member.spec, foreign_dir)
        store.close()
    with EtcdStore(member.spec.client_url, tls=tls, timeout=2) as store:
        with pytest.raises(StoreError, match=r"cannot reach etcd.*CERTIFICATE_VERIFY_FAILED"):
            store.get("k")
        ca_file.write_text(member.ca.cert_pem + other.cert_pem)
        entry = wait_until(lambda: _quiet_get(store, "k"), timeout=10, what="the store again")
        assert entry.value == "v"


def _quiet_get(store: EtcdStore, key: str) -> object:
    try:
        return store.get(key)
    except StoreError:
        return None


def test_tls_files_that_do_not_load_are_a_store_error_without_key_material(
    tmp_path: Path,
) -> None:
    ca = CA.new()
    leaf = _pair(ca)
    directory = _write(tmp_path / "pair", leaf)
    (directory / "key.pem").write_text(_pair(ca).key_pem)  # another key: does not match
    tls = EtcdTLS(tmp_path / "missing-ca.pem", directory / "cert.pem", directory / "key.pem")
    with pytest.raises(StoreError, match="TLS files do not load") as caught:
        EtcdStore("https://127.0.0.1:1", tls=tls)
    assert "PRIVATE KEY" not in str(caught.value)
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    tls = EtcdTLS(tmp_path / "ca.pem", directory / "cert.pem", directory / "key.pem")
    with pytest.raises(StoreError, match=r"key\.pem") as caught:
        EtcdStore("https://127.0.0.1:1", tls=tls)
    assert "PRIVATE KEY" not in str(caught.value)


def _service(member: Member, **config: object) -> EtcdService:
    service = ServiceConfig(
        name="etcd",
        type="etcd",
        certificate="ccs_internode_encryption",
        address=member.spec.client_address,
        etcd=member.spec,
        **config,  # type: ignore[arg-type]
    )
    internal = member.root / "internal-ca.pem"
    internal.write_text(member.ca.cert_pem)
    return EtcdService(service, 5.0, internal)


def test_the_agent_restarts_its_member_when_the_bundle_gains_a_root(member: Member) -> None:
    """A new root: the member restarts (a new process) and trusts it; dropping it again only
    rewrites the file (no restart); without supervise or a restart command: refused."""
    service = _service(member, supervise=True)
    other = CA.new()
    before = etcdmember.running_pid(member.spec)
    held = asyncio.run(service.trust([other.cert]))
    after = etcdmember.running_pid(member.spec)
    assert after is not None and after != before
    assert set(held) == {member.first_root, _fingerprint(other.cert)}
    _write(member.root / "other-client", _pair(other, "other"))
    other_client = member.context(client=member.root / "other-client")
    assert etcdmember.health(member.spec.client_url, other_client) is None
    held = asyncio.run(service.trust([]))  # the root retired: written, no restart
    assert etcdmember.running_pid(member.spec) == after
    assert other.cert_pem.strip() not in member.spec.ca_file.read_text()
    assert _fingerprint(other.cert) in held  # the running member still trusts it
    unmanaged = _service(member, supervise=False)
    with pytest.raises(ReloadFailed, match=r"reads .*ca\.pem only when it starts"):
        asyncio.run(unmanaged.trust([CA.new().cert]))


def test_a_root_dropped_now_restarts_the_member_and_it_refuses_that_root(
    member: Member,
) -> None:
    """``drop_now`` (the CA rotation retiring the old CA): a root that left the bundle is not
    trusted once trust() returns: the member restarted, a client from that root is refused."""
    service = _service(member, supervise=True)
    other = CA.new()
    asyncio.run(service.trust([other.cert]))
    _write(member.root / "other-client", _pair(other, "other"))
    other_client = member.context(client=member.root / "other-client")
    assert etcdmember.health(member.spec.client_url, other_client) is None
    before = etcdmember.running_pid(member.spec)
    held = asyncio.run(service.trust([], drop_now=True))
    after = etcdmember.running_pid(member.spec)
    assert after is not None and after != before
    assert set(held) == {member.first_root}
    assert etcdmember.health(member.spec.client_url, other_client) is not None
    assert etcdmember.health(member.spec.client_url, member.context()) is None
    asyncio.run(service.trust([], drop_now=True))  # nothing left to drop: no restart
    assert etcdmember.running_pid(member.spec) == after


def test_a_member_run_by_another_manager_is_restarted_by_its_command(member: Member) -> None:
    spec = member.spec
    script = (
        "from pathlib import PosixPath\n"
        "from clustercert import etcdmember\n"
        "from clustercert.etcdmember import MemberSpec\n"
        f"spec = {spec!r}\n"
        "etcdmember.stop(spec)\n"
        "etcdmember.start(spec)\n"
    )
    service = _service(member, supervise=False, command=(sys.executable, "-c", script))
    before = etcdmember.running_pid(spec)
    asyncio.run(service.trust([CA.new().cert]))
    assert etcdmember.running_pid(spec) not in (None, before)
    failing = _service(member, supervise=False, command=("false",))
    with pytest.raises(ReloadFailed, match="false exited with 1"):
        asyncio.run(failing.trust([CA.new().cert]))


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def test_init_writes_the_member_files_first_then_waits_for_the_store(tmp_path: Path) -> None:
    """The bootstrap order of an etcd+https store: init writes DIR/ccs/ (the first
    ccs_internode_encryption pair, key 0600, and the CA), waits; a member started with those
    files lets it seed the store; the control plane's commands then use it."""
    client, peer = free_ports(2)
    directory = tmp_path / "cluster"
    init = subprocess.Popen(
        [sys.executable, "-m", "clustercert", "init", "--dir", str(directory),
         "--store", f"etcd+https://127.0.0.1:{client}/c", "--store-wait", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ccs = directory / "ccs"
    wait_until(lambda: (ccs / "ca.pem").exists(), timeout=60, what="init's member files")
    assert (ccs / "key.pem").stat().st_mode & 0o777 == 0o600
    assert init.poll() is None  # waiting for the store
    spec = MemberSpec(
        "m1", tmp_path / "member", f"https://127.0.0.1:{client}",
        f"https://127.0.0.1:{peer}", f"m1=https://127.0.0.1:{peer}",
    )  # fmt: skip
    files = [(ccs / name).read_text() for name in ("cert.pem", "key.pem", "ca.pem")]
    etcdmember.write_bootstrap(spec, *files)
    etcdmember.start(spec)
    try:
        output, _ = init.communicate(timeout=120)
        assert init.returncode == 0, output
        assert "waiting up to 120 s for the store" in output
        token = subprocess.run(
            [sys.executable, "-m", "clustercert", "join-token", "--dir", str(directory)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert token.returncode == 0 and ".sha256:" in token.stdout, token.stderr
    finally:
        etcdmember.stop(spec)
