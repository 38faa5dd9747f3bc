"""What every route needs, built once by the server: :class:`ControlPlane`."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from clustercert import pki
from clustercert.clock import iso, utc_now
from clustercert.control.auth import Authenticator
from clustercert.control.lifecycle import Lifecycle
from clustercert.control.metrics import Metrics
from clustercert.control.outcomes import NodeOutcome
from clustercert.control.reconcile import Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.state import CertRecord, ClusterState, User
from clustercert.errors import ClusterCertError
from clustercert.validation import TrustStore, ValidatedCertificate

__all__ = ["ControlPlane"]


@dataclass
class ControlPlane:
    """Everything the routes (API and console) need, built once by the server, and the two
    actions both edges take the same way."""

    state: ClusterState
    coordinator: Coordinator
    reconciler: Reconciler
    authenticator: Authenticator
    trust: TrustStore
    ca: pki.CertificateAuthority
    metrics: Metrics
    lifecycle: Lifecycle  # alerts and the rotation job (GET /v1/cluster/alerts reads it)
    clock: Callable[[], dt.datetime] = utc_now
    join_token_ttl: dt.timedelta = dt.timedelta(hours=1)

    async def replace(
        self,
        validated: Sequence[ValidatedCertificate],
        user: User,
        expected: Mapping[str, int] | None = None,
    ) -> tuple[list[CertRecord], list[NodeOutcome]]:
        """Roll ``validated`` uploads out to every node as ``user``'s; return the records as
        stored (with their new generations) and each node's outcome. ``expected``: the
        generations the caller read (see :meth:`Coordinator.roll_out`)."""
        records = [
            CertRecord(
                name=v.name,
                generation=0,
                certificate=v.chain_pem,
                key=v.key_pem,
                fingerprint=v.fingerprint_sha256,
                not_after=iso(v.not_after),
                source="user",
                updated_at="",
                updated_by=user.email,
            )
            for v in validated
        ]
        outcomes = await self.roll_out(records, user, expected)
        return [await self.state.certificate(r.name) or r for r in records], outcomes

    async def roll_out(
        self,
        records: list[CertRecord],
        user: User,
        expected: Mapping[str, int] | None = None,
    ) -> list[NodeOutcome]:
        """The coordinator's rollout, counted and timed in the metrics by its result."""
        started = time.monotonic()
        try:
            outcomes = await self.coordinator.roll_out(records, user.email, expected)
        except ClusterCertError as exc:
            self.metrics.observe_rollout(exc.error_code, time.monotonic() - started)
            raise
        self.metrics.observe_rollout("ok", time.monotonic() - started)
        return outcomes
