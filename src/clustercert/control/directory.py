"""The cluster directory made by ``clustercert init`` and read by ``server`` and ``join-token``.

Layout::

    DIR/settings.json     cluster name, store URL
    DIR/store.db          the SQLite store (default backend)
    DIR/ca.pem            the internal CA certificate (give it to clients as --ca-file)
    DIR/ca.key            the internal CA key (0600)
    DIR/cluster.key       AES-256-GCM key that seals private keys in the store (0600)
    DIR/control-plane/    the control plane's internode client identity (clientAuth only, URI SAN
                          urn:clustercert:control-plane: agents answer no other certificate)
    DIR/run/              files the control plane's own listeners load (versioned, 0600 keys)
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from clustercert import pki
from clustercert.certfiles import write_atomically
from clustercert.clock import iso
from clustercert.control.auth import hash_password
from clustercert.control.state import (
    DEFAULT_INTERNAL_VALIDITY,
    CertRecord,
    ClusterState,
    NodeRecord,
    run_blocking,
)
from clustercert.errors import ConfigError
from clustercert.internode import CONTROL_PLANE_URI, METRICS_SCRAPER_URI, has_identity
from clustercert.names import NAMES
from clustercert.sealing import KeySealer
from clustercert.store import Store, open_store

__all__ = [
    "ClusterDirectory",
    "InitResult",
    "init_cluster",
    "internal_sans",
    "issue_internal",
    "issue_metrics_client",
]

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ClusterDirectory:
    path: Path

    @property
    def settings_file(self) -> Path:
        return self.path / "settings.json"

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.path / "ca.key"

    @property
    def cluster_key_file(self) -> Path:
        return self.path / "cluster.key"

    @property
    def identity_cert(self) -> Path:
        return self.path / "control-plane" / "cert.pem"

    @property
    def identity_key(self) -> Path:
        return self.path / "control-plane" / "key.pem"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    def settings(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.settings_file.read_text()))
        except FileNotFoundError:
            raise ConfigError(
                f"{self.path} is not a cluster directory; create one with "
                f"`clustercert init --dir {self.path}`"
            ) from None

    def ca(self) -> pki.CertificateAuthority:
        return pki.CertificateAuthority.from_pem(
            self.ca_file.read_bytes(), self.ca_key_file.read_bytes()
        )

    def open_store(self, override: str | None = None) -> Store:
        return open_store(override or self.settings()["store"])

    def state(self, store: Store) -> ClusterState:
        return ClusterState(store, KeySealer.load(self.cluster_key_file))

    def ensure_control_plane_identity(self, now: dt.datetime) -> bool:
        """Reissue the control plane's identity when it lacks the control-plane URI SAN (a
        directory made before agents checked it); return whether it did. Agents check the
        SAN, not the CN, so a certificate an operator signed with ``ca.key`` cannot pass."""
        if self.identity_cert.exists():
            leaf = x509.load_pem_x509_certificates(self.identity_cert.read_bytes())[0]
            if has_identity(leaf, CONTROL_PLANE_URI):
                return False
        _write_identity(self.ca(), self.path, now)
        return True

    def new_join_token(self, now: dt.datetime, ttl: dt.timedelta) -> str:
        """A one-time join token, for commands that run outside any event loop."""
        with self.open_store() as store:
            return run_blocking(self.state(store).new_join_token(now, ttl))


def _write_identity(ca: pki.CertificateAuthority, path: Path, now: dt.datetime) -> None:
    identity = pki.issue_leaf(
        ca,
        "clustercert-control-plane",
        sans=(CONTROL_PLANE_URI,),
        eku={"clientAuth"},
        now=now,
        validity=dt.timedelta(days=3650),
    )
    (path / "control-plane").mkdir(mode=0o700, exist_ok=True)
    directory = ClusterDirectory(path)
    write_atomically(directory.identity_key, identity.key_pem.encode())
    write_atomically(directory.identity_cert, identity.cert_pem.encode(), 0o644)


def issue_metrics_client(directory: ClusterDirectory, now: dt.datetime) -> pki.IssuedPair:
    """A client identity for a metrics scraper (Prometheus): internal CA, clientAuth, URI SAN
    ``urn:clustercert:metrics-scraper``. The agents' metrics listeners accept it; their
    internode API refuses it (403): it lacks the control plane's URI SAN."""
    return pki.issue_leaf(
        directory.ca(),
        "clustercert-metrics-scraper",
        sans=(METRICS_SCRAPER_URI,),
        eku={"clientAuth"},
        now=now,
    )


def internal_sans(nodes: Iterable[NodeRecord]) -> tuple[str, ...]:
    """The SANs of autogenerated certificates re-issued now (rotate, the rotation job): the
    defaults and the host of every node's agent URL."""
    hosts = {urlsplit(n.agent_url).hostname for n in nodes}
    return (*DEFAULT_SANS, *sorted(h for h in hosts if h))


def issue_internal(
    ca: pki.CertificateAuthority,
    name: str,
    cluster_name: str,
    sans: tuple[str, ...],
    now: dt.datetime,
    generation: int,
    actor: str,
    validity: dt.timedelta = DEFAULT_INTERNAL_VALIDITY,
) -> CertRecord:
    """An autogenerated certificate for ``name`` from the internal CA (ECDSA P-256, valid
    ``validity`` from ``now``: the cluster's ``internal_cert_validity``)."""
    row = NAMES[name]
    pair = pki.issue_leaf(
        ca,
        f"{name}.{cluster_name}",
        sans=(cluster_name, *sans),
        eku=row.required_eku,
        now=now,
        validity=validity,
    )
    leaf = x509.load_pem_x509_certificates(pair.cert_pem.encode())[0]
    return CertRecord(
        name=name,
        generation=generation,
        certificate=pair.cert_pem,
        key=pair.key_pem,
        fingerprint=pki.fingerprint_sha256(leaf),
        not_after=iso(leaf.not_valid_after_utc),
        source="internal",
        updated_at=iso(now),
        updated_by=actor,
    )


@dataclass(frozen=True)
class InitResult:
    directory: ClusterDirectory
    admin_email: str
    admin_password: str
    password_generated: bool


def init_cluster(
    path: Path,
    *,
    name: str,
    admin_email: str,
    admin_password: str | None,
    now: dt.datetime,
    store_url: str | None = None,
    internal_validity: dt.timedelta = DEFAULT_INTERNAL_VALIDITY,
) -> InitResult:
    """Create the cluster directory: CA, cluster key, store, the seven autogenerated
    certificates (generation 1, valid ``internal_validity``; the CA's own validity is 10 years)
    and the admin user. Refuses a directory already initialised."""
    directory = ClusterDirectory(path)
    if directory.settings_file.exists():
        raise ConfigError(f"{path} is already a cluster directory")
    if internal_validity <= dt.timedelta(0):
        raise ConfigError("internal certificate validity: must be positive")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = pki.new_ca(f"clustercert internal CA ({name})", now=now)
    write_atomically(directory.ca_file, ca.cert_pem.encode(), 0o644)
    write_atomically(directory.ca_key_file, ca.key_pem.encode())
    KeySealer.create(directory.cluster_key_file)
    _write_identity(ca, path, now)
    store = store_url or f"sqlite://{(path / 'store.db').resolve()}"
    write_atomically(
        directory.settings_file, json.dumps({"name": name, "store": store}, indent=2).encode()
    )
    password = admin_password or secrets.token_urlsafe(12)
    records = [
        issue_internal(ca, row.name, name, DEFAULT_SANS, now, 1, "init", internal_validity)
        for row in NAMES.values()
        if row.autogenerated
    ]

    async def seed(state: ClusterState) -> None:
        for record in records:
            await state.put_certificate(record)
        await state.create_user(admin_email, "admin", "admin", hash_password(password))

    with directory.open_store() as opened:
        meta = {"name": name, "internal_cert_seconds": int(internal_validity.total_seconds())}
        opened.put("meta/cluster", json.dumps(meta), expect_revision=0)
        run_blocking(seed(directory.state(opened)))
    return InitResult(directory, admin_email, password, admin_password is None)
