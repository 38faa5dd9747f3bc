"""What every route needs, built once by the server: :class:`ControlPlane`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from clustercert import pki
from clustercert.clock import utc_now
from clustercert.control.auth import Authenticator
from clustercert.control.lifecycle import Lifecycle
from clustercert.control.metrics import Metrics
from clustercert.control.reconcile import Reconciler
from clustercert.control.rollout import Coordinator
from clustercert.control.state import ClusterState
from clustercert.validation import TrustStore

__all__ = ["ControlPlane"]


@dataclass
class ControlPlane:
    """Everything the routes need, built once by the server."""

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
