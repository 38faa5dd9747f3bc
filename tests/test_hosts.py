"""Hosts (issue #13) on loopback: the control plane's names (init --san, server --advertise),
wildcard listen addresses refused without an advertised address, join tokens that pin the CA,
and failures that say whether the name, the CA or the network is wrong.

The same features across real hosts (network namespaces): tests/test_multihost.py."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from certfactory import CA
from clusterkit import wait_until
from cryptography import x509

from clustercert import pki
from clustercert.agent.config import load_agent_config
from clustercert.cli import main
from clustercert.control.directory import ClusterDirectory, reissue_internal
from clustercert.demo import free_port
from clustercert.errors import ConfigError
from clustercert.jointoken import JoinToken, ca_hash

PASSWORD = "correct horse battery staple"


def _init(path: Path, *args: str) -> int:
    return main(["init", "--dir", str(path), "--admin-password", PASSWORD, *args])


def _sans(directory: ClusterDirectory, name: str) -> list[str]:
    with directory.open_store() as store:
        record = asyncio.run(directory.state(store).certificate(name))
        assert record is not None
        return pki.subject_alt_names(x509.load_pem_x509_certificate(record.certificate.encode()))


# --- init --san ---------------------------------------------------------------------------------


def test_init_san_names_the_control_plane_in_api_and_cm(tmp_path: Path) -> None:
    assert (
        _init(tmp_path / "c", "--san", "10.77.0.10", "--san", "cp.example.net,2001:db8::0:1") == 0
    )
    directory = ClusterDirectory(tmp_path / "c")
    for name in ("api", "cm"):
        assert {"10.77.0.10", "cp.example.net", "2001:db8::1", "localhost"} <= set(
            _sans(directory, name)
        )
    # Node-facing certificates name nodes, not the control plane.
    assert "cp.example.net" not in _sans(directory, "proxy")
    with directory.open_store() as store:
        names = asyncio.run(directory.state(store).control_plane_names())
    assert names == ["10.77.0.10", "cp.example.net", "2001:db8::1"]
    assert json.loads(directory.settings_file.read_text())["sans"] == names


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        ("0.0.0.0", "'0.0.0.0' means every address and names no host"),  # noqa: S104
        ("::", "'::' means every address"),
        ("bad_name", "'bad_name' is neither an IP address nor a DNS name"),
    ],
)
def test_init_refuses_a_san_that_names_no_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], san: str, reason: str
) -> None:
    assert _init(tmp_path / "c", "--san", san) == ConfigError.exit_code
    assert f"error: invalid_configuration: --san: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing was created


# --- agent configuration ------------------------------------------------------------------------


def _agent_config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'name = "n1"\ndata_dir = "{tmp_path}"\ncontrol_plane_url = "https://10.77.0.10:9443"\n'
        + extra
    )
    return path


@pytest.mark.parametrize("listen", ["0.0.0.0:9444", "[::]:9444", ":9444"])
def test_a_wildcard_listen_address_needs_advertise_url(tmp_path: Path, listen: str) -> None:
    path = _agent_config(tmp_path, f'listen = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"^advertise_url: required because listen = .*9444.* "
                       r"add advertise_url = \"https://THIS_NODE_ADDRESS:9444\"$"):  # fmt: skip
        load_agent_config(path)


def test_advertise_url_is_used_and_checked(tmp_path: Path) -> None:
    path = _agent_config(
        tmp_path, 'listen = "0.0.0.0:9444"\nadvertise_url = "https://10.77.0.11:9444/"\n'
    )
    assert load_agent_config(path).advertise_url == "https://10.77.0.11:9444"
    path = _agent_config(
        tmp_path, 'listen = "0.0.0.0:9444"\nadvertise_url = "https://0.0.0.0:9444"\n'
    )
    with pytest.raises(ConfigError, match=r"^advertise_url: 'https://0.0.0.0:9444' names no host"):
        load_agent_config(path)
    path = _agent_config(tmp_path, 'listen = "10.77.0.11:9444"\n')
    assert load_agent_config(path).advertise_url == "https://10.77.0.11:9444"


# --- join tokens --------------------------------------------------------------------------------


def test_join_token_carries_the_ca_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _init(tmp_path / "c") == 0
    capsys.readouterr()
    assert main(["join-token", "--dir", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out.strip()
    token = JoinToken.parse(printed)
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.pem").read_bytes())
    assert token.ca_hash == ca_hash(ca) and str(token) == printed

    # kubeadm's hash: SHA-256 of the DER SubjectPublicKeyInfo, as `openssl` computes it.
    def openssl(*args: str, data: bytes) -> bytes:
        return subprocess.run(
            ["openssl", *args], input=data, capture_output=True, check=True, timeout=30
        ).stdout

    public = openssl("x509", "-pubkey", "-noout", data=(tmp_path / "c" / "ca.pem").read_bytes())
    der = openssl("pkey", "-pubin", "-outform", "DER", data=public)
    spki = openssl("dgst", "-sha256", "-hex", data=der).decode()
    assert token.ca_hash == "sha256:" + spki.split()[-1]
    token.check(ca)
    other = CA.new()
    mismatch = r"^the control plane presented a CA whose public key hash is sha256:[0-9a-f]{64}, "
    with pytest.raises(ConfigError, match=mismatch + "but the join token pins sha256:"):
        token.check(other.cert)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"^join_token: empty"),
        ("abc.sha256:1234", r"^join_token: after the '.' expected the CA pin sha256:<64 hex"),
        ("abc.md5:" + "0" * 64, r"^join_token: after the '.' expected the CA pin"),
    ],
)
def test_a_malformed_join_token_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JoinToken.parse(text)


def test_a_bare_secret_is_still_a_token() -> None:
    assert JoinToken.parse("abc") == JoinToken("abc", None)


# --- the control plane's names, live -------------------------------------------------------------


def _server(directory: Path, listen: str, *args: str) -> subprocess.Popen[bytes]:
    with (directory / "server.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "clustercert", "server", "--dir", str(directory),
             "--listen", listen, "--no-console", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _list(url: str, ca_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustercert", "certificates", "list", "--url", url,
         "--user", "admin@cluster.local", "--password", PASSWORD, "--ca-file", str(ca_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.cluster
def test_name_mismatch_is_told_apart_and_advertise_fixes_it(tmp_path: Path) -> None:
    """The control plane listens on 127.0.0.2, a loopback address its api certificate does not
    name: the CLI says so and lists the names; restarted with --advertise 127.0.0.2 it
    re-issues api (and cm) and the same command works."""
    directory = tmp_path / "c"
    assert _init(directory) == 0
    port = free_port("127.0.0.2")
    url = f"https://127.0.0.2:{port}"
    ca_file = directory / "ca.pem"
    server = _server(directory, f"127.0.0.2:{port}")
    try:
        result = wait_until(
            lambda: (r := _list(url, ca_file)).returncode != 0 and "does not name" in r.stderr
            and r, timeout=60, what="the name-mismatch error",
        )  # fmt: skip
        assert (
            "error: invalid_configuration: the API's certificate does not name 127.0.0.2 "
            "(it names: cluster.local, localhost, 127.0.0.1, ::1); start the control plane with "
            "`clustercert server --advertise 127.0.0.2`"
        ) in result.stderr
        # A CA the client does not trust is a different failure, with a different fix.
        other = tmp_path / "other-ca.pem"
        other.write_text(CA.new().cert_pem)
        untrusted = _list(url, other)
        assert "api_certificate_untrusted: cannot verify the certificate" in untrusted.stderr
        assert "pass the CA that issued it with --ca-file" in untrusted.stderr
    finally:
        _stop(server)
    # Nothing listens any more: unreachable, which is neither of the above.
    gone = _list(url, ca_file)
    assert f"api_unreachable: cannot connect to {url}: connection refused" in gone.stderr

    server = _server(directory, f"127.0.0.2:{port}", "--advertise", url)
    try:
        listed = wait_until(
            lambda: (r := _list(url, ca_file)).returncode == 0 and r, timeout=60,
            what="the API by 127.0.0.2",
        )  # fmt: skip
        assert "api" in listed.stdout
        assert "127.0.0.2" in _sans(ClusterDirectory(directory), "api")
        assert "127.0.0.2" in _sans(ClusterDirectory(directory), "cm")
    finally:
        _stop(server)


@pytest.mark.cluster
def test_server_refuses_a_wildcard_listen_without_a_name(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    assert _init(directory) == 0
    result = subprocess.run(
        [sys.executable, "-m", "clustercert", "server", "--dir", str(directory),
         "--listen", f"0.0.0.0:{free_port()}", "--no-console"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == ConfigError.exit_code
    assert "error: invalid_configuration: --listen 0.0.0.0:" in result.stderr
    assert "pass --advertise ADDRESS_OR_NAME" in result.stderr
    assert ClusterDirectory(directory).settings()["sans"] == []  # nothing recorded


# --- which certificates must name what (in-process; the real rollout: test_multihost.py) --------


class RecordingCoordinator:
    """A fake at the coordinator seam: records what SanKeeper would roll out. In-process
    protocol logic only; tests/test_multihost.py runs the real rollout across hosts."""

    def __init__(self) -> None:
        self.rolled: list[list[str]] = []

    async def roll_out(self, proposed: Any, actor: str) -> list[Any]:
        self.rolled.append(sorted(r.name for r in proposed))
        return []


def test_sankeeper_reissues_what_no_longer_names_every_node(tmp_path: Path) -> None:
    import datetime as dt

    from clustercert.control.health import NodeHealth
    from clustercert.control.sankeeper import SanKeeper

    assert _init(tmp_path / "c", "--san", "10.77.0.10") == 0
    directory = ClusterDirectory(tmp_path / "c")
    ca = directory.ca()
    node_facing = sorted(
        ["proxy", "syncer", "metrics_exporter", "data_internode_encryption",
         "ccs_internode_encryption"]
    )  # fmt: skip

    def names_of(record: Any) -> list[str]:
        return pki.subject_alt_names(x509.load_pem_x509_certificate(record.certificate.encode()))

    async def scenario(state: Any) -> None:
        coordinator = RecordingCoordinator()
        keeper = SanKeeper(state, coordinator, ca, NodeHealth())  # type: ignore[arg-type]
        assert await keeper.stale() == []  # as init issued them
        now = dt.datetime.now(dt.UTC)
        await state.add_node("n1", "https://10.77.0.11:9444", now)
        assert sorted(r.name for r in await keeper.stale()) == node_facing
        assert await keeper.check() is True
        assert coordinator.rolled == [node_facing]
        proxy = await reissue_internal(state, ca, "proxy", now, "test")
        assert names_of(proxy) == ["cluster.local", "localhost", "127.0.0.1", "::1", "10.77.0.11"]
        api = await reissue_internal(state, ca, "api", now, "test")
        assert names_of(api) == ["cluster.local", "localhost", "127.0.0.1", "::1", "10.77.0.10"]
        # A certificate the operator uploaded is theirs: never re-issued.
        stored = await state.certificate("proxy")
        await state.put_certificate(
            replace(stored, source="user", generation=stored.generation + 1)
        )
        assert "proxy" not in [r.name for r in await keeper.stale()]

    with directory.open_store() as store:
        asyncio.run(scenario(directory.state(store)))


def test_node_health_is_unknown_until_heard_from() -> None:
    import datetime as dt

    from clustercert.control.health import NodeHealth

    moment = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    health = NodeHealth(clock=lambda: moment)
    assert health.of(1).reachable is False and health.of(1).last_seen is None
    health.answered(1)
    assert health.of(1).reachable is True and health.of(1).last_seen == "2030-01-02T03:04:05Z"
    health.failed(1, "timed out")
    assert health.of(1).reachable is False and health.of(1).error == "timed out"
    assert health.of(1).last_seen == "2030-01-02T03:04:05Z"  # still when it was last heard
    health.forget(1)
    assert health.of(1).last_seen is None


# --- joining with only the URL and the token (loopback; across hosts: test_multihost.py) --------


@pytest.mark.cluster
def test_an_agent_joins_with_only_the_url_and_the_token(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from conftest import start_cluster

    cluster = start_cluster(tmp_path_factory, 1)
    agent: subprocess.Popen[bytes] | None = None
    try:
        token = JoinToken.parse(
            subprocess.run(
                [sys.executable, "-m", "clustercert", "join-token", "--dir",
                 str(cluster.directory)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()
        )  # fmt: skip
        data = tmp_path / "node"
        config = tmp_path / "agent.toml"

        def write(join_token: str) -> None:
            config.write_text(
                f'name = "pinned"\ndata_dir = "{data}"\nlisten = "127.0.0.1:{free_port()}"\n'
                f'control_plane_url = "{cluster.api_url}"\njoin_token = "{join_token}"\n'
            )

        def run_agent() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "clustercert", "agent", "--config", str(config)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        # A pin that is not this cluster's CA: refused before the secret is sent.
        write(f"{token.secret}.sha256:{'ab' * 32}")
        refused = run_agent()
        assert refused.returncode == ConfigError.exit_code
        assert f"but the join token pins sha256:{'ab' * 32}" in refused.stderr
        assert not (data / "identity").exists() and not (data / "ca.pem").exists()
        # A bare secret without ca_file: the agent says what it needs.
        write(token.secret)
        bare = run_agent()
        assert bare.returncode == ConfigError.exit_code
        assert "ca_file: required when join_token carries no CA pin" in bare.stderr
        # The whole token: the secret was never spent above, so it still joins.
        write(str(token))
        with (tmp_path / "agent.log").open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "clustercert", "agent", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        with cluster.client() as client:
            wait_until(
                lambda: any(n["name"] == "pinned" and n["in_sync"]
                            for n in client.get("/v1/nodes").json()),
                timeout=60, what="the pinned node in sync",
            )  # fmt: skip
        assert (data / "ca.pem").read_bytes() == cluster.cluster.ca_file.read_bytes()
        assert (data / "ca.pem").stat().st_mode & 0o777 == 0o644
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        cluster.stop()
