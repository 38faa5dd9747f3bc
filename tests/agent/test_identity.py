"""The node's identity files during an internal CA rotation (agent/identity.py): the key is made
on the node, a certificate for another key is refused, and a switch a crash interrupted is
finished at the next load. Real keys and certificates, on disk; no processes."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509

from clustercert import pki
from clustercert.agent.identity import IdentityRefused, install, pending_csr, recover
from clustercert.certfiles import write_atomically

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _joined(directory: Path, ca: pki.CertificateAuthority) -> None:
    key = pki.new_private_key()
    leaf = pki.sign_csr(ca, pki.make_csr(key, "node-1"), "node-1", sans=("127.0.0.1",),
                        eku={"serverAuth"}, now=NOW)  # fmt: skip
    write_atomically(directory / "key.pem", pki.key_to_pem(key).encode())
    write_atomically(directory / "cert.pem", leaf.encode(), 0o644)


def _matches(directory: Path) -> bool:
    cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    key = pki.load_private_key((directory / "key.pem").read_text())
    return pki.spki_sha256(cert.public_key()) == pki.spki_sha256(key.public_key())


def test_the_csr_keeps_its_key_until_installed_and_the_key_file_is_private(tmp_path: Path) -> None:
    old, new = pki.new_ca("old", now=NOW), pki.new_ca("new", now=NOW)
    _joined(tmp_path, old)
    first = pending_csr(tmp_path, "node-1")
    again = pending_csr(tmp_path, "node-1")
    csr_key = x509.load_pem_x509_csr(first.encode()).public_key()
    assert pki.spki_sha256(csr_key) == pki.spki_sha256(
        x509.load_pem_x509_csr(again.encode()).public_key()
    )
    assert os.stat(tmp_path / "next-key.pem").st_mode & 0o777 == 0o600
    leaf = pki.sign_csr(new, first, "node-1", sans=("127.0.0.1",), eku={"serverAuth"}, now=NOW)
    install(tmp_path, leaf)
    install(tmp_path, leaf)  # idempotent
    assert (tmp_path / "cert.pem").read_text() == leaf
    assert _matches(tmp_path)
    assert not (tmp_path / "next-key.pem").exists()


def test_a_certificate_for_another_key_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    old = pki.new_ca("old", now=NOW)
    _joined(tmp_path, old)
    before = (tmp_path / "cert.pem").read_bytes()
    pending_csr(tmp_path, "node-1")
    stranger = pki.issue_leaf(old, "node-1", sans=("127.0.0.1",), eku={"serverAuth"}, now=NOW)
    with pytest.raises(IdentityRefused, match="not for this node's pending key"):
        install(tmp_path, stranger.cert_pem)
    assert (tmp_path / "cert.pem").read_bytes() == before
    assert _matches(tmp_path)


def test_a_switch_interrupted_between_the_two_renames_is_finished(tmp_path: Path) -> None:
    old, new = pki.new_ca("old", now=NOW), pki.new_ca("new", now=NOW)
    _joined(tmp_path, old)
    csr = pending_csr(tmp_path, "node-1")
    leaf = pki.sign_csr(new, csr, "node-1", sans=("127.0.0.1",), eku={"serverAuth"}, now=NOW)
    # The crash: cert.next.pem written and the key renamed, the certificate not yet.
    write_atomically(tmp_path / "cert.next.pem", leaf.encode(), 0o644)
    os.replace(tmp_path / "next-key.pem", tmp_path / "key.pem")
    assert not _matches(tmp_path)
    recover(tmp_path)
    assert _matches(tmp_path)
    assert (tmp_path / "cert.pem").read_text() == leaf
    assert not (tmp_path / "cert.next.pem").exists()
