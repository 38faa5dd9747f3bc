"""``clustercert certificates validate``: offline validation, exit codes and the JSON report."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from certfactory import CA, Leaf, key_pem, new_key
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from clustercert.cli import cli, main

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
AT = ["--at", "2030-01-01T00:00:00Z"]


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.new("CLI Root", now=T0)


@pytest.fixture(scope="module")
def leaf(root: CA) -> Leaf:
    return root.intermediate("CLI Intermediate").issue(
        "db.example", sans=["db.example", *(f"n{i}.example" for i in range(20))]
    )


@pytest.fixture
def files(tmp_path: Path, root: CA, leaf: Leaf) -> dict[str, Path]:
    paths = {
        "chain": tmp_path / "chain.pem",
        "key": tmp_path / "key.pem",
        "ca": tmp_path / "ca.pem",
        "other_key": tmp_path / "other.key",
        "der": tmp_path / "leaf.der",
    }
    paths["chain"].write_text(leaf.chain_pem)
    paths["key"].write_text(leaf.key_pem)
    paths["ca"].write_text(root.cert_pem)
    paths["other_key"].write_text(key_pem(new_key()))
    paths["der"].write_bytes(leaf.cert.public_bytes(serialization.Encoding.DER))
    return paths


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["certificates", "validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def report(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # exactly one JSON object
    parsed = json.loads(lines[0])
    assert isinstance(parsed, dict)
    return parsed


def test_valid_human_output(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    code, out, err = run(
        capsys, "--name", "proxy", "--cert", str(files["chain"]), "--key", str(files["key"]),
        "--ca-file", str(files["ca"]), *AT,
    )  # fmt: skip
    assert code == 0, err
    assert "valid: the certificate passes every check for 'proxy'" in out
    assert "subject:     CN=db.example" in out
    assert "db.example, n0.example, n1.example, n2.example, n3.example (+16 more)" in out
    assert "issuer:      CN=CLI Intermediate" in out
    assert "key:         EC-P256" in out
    assert "chain:       2 certificate(s)" in out


def test_valid_json(capsys: pytest.CaptureFixture[str], files: dict[str, Path], leaf: Leaf) -> None:
    code, out, _ = run(
        capsys, "--name", "proxy", "--cert", str(files["chain"]), "--key", str(files["key"]),
        "--ca-file", str(files["ca"]), "--at", "2030-12-20T00:00:00+00:00", "--json",
    )  # fmt: skip
    assert code == 0
    body = report(out)
    assert body["valid"] is True
    assert body["http_status"] == 200
    assert body["error_code"] is None
    assert body["certificate"]["fingerprint_sha256"] == leaf.fingerprint
    assert body["certificate"]["chain_length"] == 2
    assert len(body["certificate"]["sans"]) == 21
    assert any("expires in 12 days" in w for w in body["warnings"])


@pytest.mark.parametrize(
    ("extra", "status", "error_code"),
    [
        ([], 404, "issuer_not_found"),  # no --ca-file: the test root is not trusted
        (["--ca-file", "{ca}", "--at", "2040-01-01T00:00:00Z"], 406, "certificate_expired"),
        (["--ca-file", "{ca}", "--key", "{other_key}"], 400, "key_values_mismatch"),
        (["--ca-file", "{ca}", "--name", "nope"], 403, "unknown_certificate"),
        (["--ca-file", "{ca}", "--name", "mtls_trusted_ca"], 400, "unexpected_key"),
    ],
    ids=["issuer-not-found", "expired", "mismatch", "unknown-name", "unexpected-key"],
)
def test_invalid_json_reports_the_update_cert_status(
    capsys: pytest.CaptureFixture[str],
    files: dict[str, Path],
    extra: list[str],
    status: int,
    error_code: str,
) -> None:
    args = ["--name", "proxy", "--cert", str(files["chain"]), "--key", str(files["key"]), *AT]
    args += [a.format(ca=files["ca"], other_key=files["other_key"]) for a in extra]
    code, out, err = run(capsys, *args, "--json")
    assert code == 1
    body = report(out)
    assert body == {
        "valid": False,
        "http_status": status,
        "error_code": error_code,
        "description": body["description"],
        "warnings": [],
        "certificate": None,
    }
    assert body["description"]
    assert error_code in err  # the one error handler in main() also reports it


def test_invalid_human_output_says_how_to_fix(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path]
) -> None:
    code, out, err = run(
        capsys, "--name", "proxy", "--cert", str(files["der"]), "--key", str(files["key"]), *AT
    )
    assert code == 1
    assert out == ""
    assert "invalid_certificate" in err
    assert "openssl x509 -inform der -in file.der -out cert.pem" in err


def test_default_time_is_now(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Without --at the CLI validates at the real clock (factory defaults are around now)."""
    ca = CA.new("Now Root")
    leaf = ca.issue("now.example")
    (tmp_path / "c.pem").write_text(leaf.chain_pem)
    (tmp_path / "k.pem").write_text(leaf.key_pem)
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    code, out, _ = run(
        capsys, "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"),
        "--ca-file", str(tmp_path / "ca.pem"), "--json",
    )  # fmt: skip
    assert code == 0
    assert report(out)["certificate"]["subject"] == "CN=now.example"


@pytest.mark.parametrize(
    "argv",
    [
        ["--name", "proxy"],  # --cert missing
        ["--cert", "/nonexistent/cert.pem"],
        ["--cert", "{chain}", "--at", "next tuesday"],
        ["--cert", "{chain}", "--ca-file", "{key}"],  # no certificate in the CA file
        ["--cert", "{chain}", "--bogus"],
    ],
    ids=["no-cert", "missing-file", "bad-time", "bad-ca-file", "unknown-option"],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], argv: list[str]
) -> None:
    args = [a.format(chain=files["chain"], key=files["key"]) for a in argv]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    assert "Usage:" in err or "Error:" in err


def test_console_script(files: dict[str, Path]) -> None:
    """The installed ``clustercert`` entry point, in a subprocess, as an operator runs it."""
    script = Path(sys.executable).with_name("clustercert")
    command = str(script) if script.exists() else shutil.which("clustercert")
    assert command, "the clustercert console script is not installed"
    done = subprocess.run(
        [
            command, "certificates", "validate", "--name", "syncer",
            "--cert", str(files["chain"]), "--key", str(files["key"]),
            "--ca-file", str(files["ca"]), *AT, "--json",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] is True
    failed = subprocess.run(
        [command, "certificates", "validate", "--cert", str(files["chain"]), *AT, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error_code"] == "missing_key"


def test_every_help_text_stands_alone() -> None:
    """Issue #11: no help refers to a document the user does not have ("DESIGN §3"), and
    every client command offers --json."""
    runner = CliRunner()

    def walk(command: click.Command, path: list[str]) -> list[tuple[list[str], str]]:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        found = [(path, result.output)]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, [*path, name])
        return found

    helps = walk(cli, [])
    assert len(helps) > 15
    for path, text in helps:
        assert "DESIGN" not in text and "§" not in text, path
    remote = [t for _, t in helps if "--cluster-file" in t]
    assert len(remote) >= 9 and all("--json" in t for t in remote)
    set_help = dict((" ".join(p), t) for p, t in helps)["certificates set"]
    assert "- reads stdin" in set_help and "private key" in set_help
