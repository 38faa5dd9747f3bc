"""``/v1/cluster`` and ``/v1/cluster/alerts``: the cluster's lifecycle settings and the alerts
they drive, in Redis Enterprise's shapes (docs/alerts.md).

=============================  ===========================================  ==================
method and path                body                                         permission
=============================  ===========================================  ==================
``GET /v1/cluster``            —                                            view_cluster_info
``PUT /v1/cluster``            any subset of the settings (merged)          update_cluster
``GET /v1/cluster/alerts``     —                                            view_cluster_info
=============================  ===========================================  ==================

A rejected ``PUT`` (unknown key, wrong type, value out of range, a new ``name``) is a 400
``invalid_schema`` naming the key, and changes nothing. A change is an audit event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from clustercert.control.apidoc import answers, request_body
from clustercert.control.audit import SettingsEvent
from clustercert.control.http import parse_model, read_json
from clustercert.control.settings import (
    AlertSettings,
    CertRotationJobSettings,
    ClusterSettings,
    ClusterSettingsUpdate,
    changed_keys,
)
from clustercert.errors import InvalidSchema
from clustercert.roles import UPDATE, VIEW

if TYPE_CHECKING:
    from clustercert.control.plane import ControlPlane

__all__ = ["cluster_router"]


class ClusterAnswer(BaseModel):
    """``GET``/``PUT /v1/cluster``: the name and the settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    alert_settings: AlertSettings
    cert_rotation_job_settings: CertRotationJobSettings


class AlertAnswer(BaseModel):
    """Redis Enterprise's alert object; ``change_value`` adds what is affected."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool
    state: bool
    severity: str
    change_time: str | None
    change_value: dict[str, Any]


def _answer(name: str, settings: ClusterSettings) -> dict[str, Any]:
    return {"name": name, **settings.model_dump()}


def cluster_router(cp: ControlPlane) -> APIRouter:
    """The routes, for ``app.include_router``; bodies are read at the shared HTTP edge."""

    router = APIRouter()

    def caller(request: Request, permission: str) -> str:
        user = cp.authenticator.authenticate_scope(request.scope)
        user.require(permission)
        return user.email

    @router.get("/v1/cluster", responses=answers(ClusterAnswer, 401, 403))
    async def get_cluster(request: Request) -> dict[str, Any]:
        caller(request, VIEW)
        return _answer(cp.state.cluster_name(), cp.state.settings())

    @router.put(
        "/v1/cluster",
        openapi_extra=request_body(ClusterSettingsUpdate),
        responses=answers(ClusterAnswer, 400, 401, 403, 413, 415),
    )
    async def put_cluster(request: Request) -> dict[str, Any]:
        who = caller(request, UPDATE)
        update = parse_model(ClusterSettingsUpdate, await read_json(request))
        name = cp.state.cluster_name()
        if update.name is not None and update.name != name:
            raise InvalidSchema(
                f"name: the cluster is {name!r} and cannot be renamed (every certificate's "
                "SANs and every node's metrics carry the name)"
            )
        old, new = cp.state.replace_settings(
            lambda current: parse_model(ClusterSettings, update.merged(current))
        )
        changes = changed_keys(old, new)
        if changes:
            cp.state.add_event(SettingsEvent(cp.clock(), who, "settings", changes=changes))
        return _answer(name, new)

    @router.get("/v1/cluster/alerts", responses=answers(dict[str, AlertAnswer], 401, 403))
    async def get_alerts(request: Request) -> dict[str, Any]:
        """Each certificate alert evaluated now (``change_time``: when it last flipped)."""
        caller(request, VIEW)
        return {name: state.as_json() for name, state in cp.lifecycle.current_alerts().items()}

    return router
