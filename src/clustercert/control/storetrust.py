"""The roots the control plane's etcd client trusts: ``DIR/etcd-ca.pem``.

With the store in etcd over HTTPS (``etcd+https://``), the members serve
``ccs_internode_encryption``. The control plane verifies them against the internal CA and every
root pinned in the cluster's trust record (control/trust.py): a rollout to a certificate from
a new root pins it (phase *a*) before any member is staged, and this file gets it at the same
moment (:meth:`StoreTrustFile.pinned`), so the control plane trusts the new root before any
member presents it. Other control planes follow the record (:meth:`StoreTrustFile.refresh`,
every second, in the server's loop that follows the store), and the roots a rollout in phase
*a* is adding: the members restart one after the other to load them, which takes seconds, so
the others trust a new root well before the rollout stages it. The store client loads the file
again when it changes (store/etcd.py); the file is kept across restarts, so a control plane
that restarts after a rotation to a new root still reaches the store. Roots leave the file
when they leave the record; a running client keeps trusting them until it restarts (an SSL
context only adds trust).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from clustercert import pki
from clustercert.certfiles import write_atomically
from clustercert.control.state import ROLLOUT_KEY, TRUST_KEY, ClusterState

__all__ = ["StoreTrustFile", "write_store_trust"]

log = logging.getLogger("clustercert.storetrust")


def write_store_trust(path: Path, internal_ca_pem: str, roots: Sequence[str]) -> bool:
    """Write the internal CA and ``roots`` (PEM) to ``path`` (0644, atomically) unless it holds
    exactly them already; return whether it wrote."""
    certs = x509.load_pem_x509_certificates(
        "".join([internal_ca_pem, *(r if r.endswith("\n") else r + "\n" for r in roots)]).encode()
    )
    unique = {pki.fingerprint_sha256(c): c for c in certs}
    content = pki.certificates_to_pem(unique[f] for f in sorted(unique)).encode()
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    write_atomically(path, content, 0o644)
    return True


class StoreTrustFile:
    """``DIR/etcd-ca.pem`` kept as the internal CA plus the recorded pinned roots.

    ``internal_ca_file``: the directory's ``ca.pem``, read at every write (it holds the old and
    the new CA while the internal CA rotates)."""

    name = "etcd-ca.pem"  # how the server's loop that follows the store names it

    def __init__(self, path: Path, internal_ca_file: Path, state: ClusterState) -> None:
        self.path = path
        self.internal_ca_file = internal_ca_file
        self.state = state
        self._seen: tuple[int, int] = (-1, -1)
        self._ca_stamp: tuple[int, int] | None = None

    def _ca_changed(self) -> bool:
        stat = self.internal_ca_file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        changed = stamp != self._ca_stamp
        self._ca_stamp = stamp
        return changed

    def pinned(self, roots: Sequence[str]) -> None:
        """The trust phase pinned ``roots`` on every node: trust them from now on too."""
        if write_store_trust(self.path, self.internal_ca_file.read_text(), roots):
            log.info("the store's CA file %s now trusts %d pinned root(s)", self.path, len(roots))

    async def refresh(self) -> None:
        """Follow the trust record and a rollout adding roots (another control plane's); both
        records are read only when their revisions moved."""
        polled = await self.state.polled_revisions(recent=True)
        seen = (polled.get(TRUST_KEY, 0), polled.get(ROLLOUT_KEY, 0))
        if seen != self._seen or self._ca_changed():
            record = await self.state.trust()
            in_flight = await self.state.rollout_in_flight()
            adding = in_flight.trust_added if in_flight is not None else []
            self.pinned([*record.roots, *adding])
            self._seen = seen
