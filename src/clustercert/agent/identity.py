"""The node's internode identity files and their renewal during an internal CA rotation.

``DIR/identity/`` holds ``cert.pem`` (the node's certificate, serverAuth), ``key.pem`` (0600),
``ca.pem`` (the internal CA certificates the node trusts: the control plane's client
certificate, redis trust bundles) and ``node.json``. A renewal adds, for a while:

- ``next-key.pem`` (0600): the key of the next identity, made on the node when the control plane
  asks for a CSR; asked again, the node answers a CSR for the same key (idempotent);
- ``cert.next.pem``: the signed next certificate, written before anything is switched.

Switching is two renames, key then certificate. A crash between them leaves ``cert.next.pem``,
and :func:`recover` (run before the identity is loaded) finishes the switch, so the node never
starts with a certificate and a key that do not match.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clustercert import pki
from clustercert.certfiles import write_atomically

__all__ = ["IdentityRefused", "ca_fingerprints", "install", "pending_csr", "recover", "write_ca"]


class IdentityRefused(Exception):
    """The new identity cannot be installed; the message says why (nothing was switched)."""


def _key_spki(path: Path) -> str | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        return None
    return pki.spki_sha256(key.public_key())


def _cert_spki(path: Path) -> str:
    return pki.spki_sha256(x509.load_pem_x509_certificates(path.read_bytes())[0].public_key())


def pending_csr(directory: Path, common_name: str) -> str:
    """A CSR for the node's next identity: a new key on the first call (0600, never sent),
    the same key on later calls until the identity is installed."""
    next_key = directory / "next-key.pem"
    if not next_key.exists():
        write_atomically(next_key, pki.key_to_pem(pki.new_private_key()).encode())
    key = serialization.load_pem_private_key(next_key.read_bytes(), None)
    return pki.make_csr(key, common_name)  # type: ignore[arg-type]


def install(directory: Path, certificate_pem: str) -> None:
    """Make ``certificate_pem`` (signed from :func:`pending_csr`'s key) the node's identity.
    Installing the identity already installed is a no-op. Raises IdentityRefused when the
    certificate does not parse or is not for the pending key."""
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    try:
        leaf = x509.load_pem_x509_certificates(certificate_pem.encode())[0]
    except ValueError as exc:
        raise IdentityRefused(f"the identity certificate does not parse: {exc}") from None
    spki = pki.spki_sha256(leaf.public_key())
    current = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    if pki.fingerprint_sha256(current) == pki.fingerprint_sha256(leaf):
        return
    if _key_spki(directory / "next-key.pem") != spki:
        raise IdentityRefused(
            "the identity certificate is not for this node's pending key (ask for a CSR first)"
        )
    write_atomically(directory / "cert.next.pem", certificate_pem.encode(), 0o644)
    recover(directory)
    if _cert_spki(cert_file) != _key_spki(key_file):  # pragma: no cover - recover() did it
        raise IdentityRefused("the identity files do not match after the switch")


def recover(directory: Path) -> None:
    """Finish a switch a crash interrupted (see the module docstring); nothing to do without
    ``cert.next.pem``."""
    staged = directory / "cert.next.pem"
    if not staged.exists():
        return
    spki = _cert_spki(staged)
    next_key = directory / "next-key.pem"
    if _key_spki(next_key) == spki:
        os.replace(next_key, directory / "key.pem")
    if _key_spki(directory / "key.pem") == spki:
        os.replace(staged, directory / "cert.pem")
    else:
        staged.unlink()  # for a key this node no longer has: never usable
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_ca(path: Path, certificates: list[x509.Certificate]) -> None:
    """Replace ``ca.pem`` atomically (0644: public certificates only)."""
    write_atomically(path, pki.certificates_to_pem(certificates).encode(), 0o644)


def ca_fingerprints(path: Path) -> tuple[str, ...]:
    """The SHA-256 fingerprints of the certificates in ``ca.pem``, sorted."""
    return tuple(sorted(pki.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(
        path.read_bytes())))  # fmt: skip
