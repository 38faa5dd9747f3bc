"""``/v1/cluster`` and ``/v1/cluster/alerts``: the cluster's lifecycle settings and the alerts
they drive, in Redis Enterprise's shapes (docs/alerts.md).

=============================  ===========================================  ==================
method and path                body                                         permission
=============================  ===========================================  ==================
``GET /v1/cluster``            —                                            view_cluster_info
``PUT /v1/cluster``            any subset of the settings (merged)          update_cluster
``GET /v1/cluster/alerts``     —                                            view_cluster_info
``GET .../control_planes``     —                                            view_cluster_info
=============================  ===========================================  ==================

``GET /v1/cluster/control_planes`` lists the control planes sharing the store, which one leads
(runs the reconciler) and when each was last seen (docs/deploy.md, "Several control planes").

A rejected ``PUT`` (unknown key, wrong type, value out of range, a new ``name``) is a 400
``invalid_schema`` naming the key, and changes nothing. A change is an audit event.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from clustercert.control.answers import answers, request_body
from clustercert.control.audit import SettingsEvent
from clustercert.control.http import Plane, Updater, Viewer, parse_model, read_json
from clustercert.control.settings import (
    AlertSettings,
    CertRotationJobSettings,
    ClusterSettings,
    ClusterSettingsUpdate,
    changed_keys,
)
from clustercert.errors import InvalidSchema

__all__ = ["router"]

router = APIRouter()


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


class ControlPlaneAnswer(BaseModel):
    """One control plane sharing the store, as it registered itself."""

    model_config = ConfigDict(extra="forbid")

    name: str
    api_url: str
    advertise: list[str]
    leader: bool
    alive: bool
    started_at: str
    last_seen: str
    this: bool  # the control plane that answered


class ControlPlanesAnswer(BaseModel):
    control_planes: list[ControlPlaneAnswer]


def _answer(name: str, settings: ClusterSettings) -> dict[str, Any]:
    return {"name": name, **settings.model_dump()}


@router.get("/v1/cluster", responses=answers(ClusterAnswer, 401, 403))
async def get_cluster(cp: Plane, user: Viewer) -> dict[str, Any]:
    return _answer(await cp.state.cluster_name(), await cp.state.settings())


@router.put(
    "/v1/cluster",
    openapi_extra=request_body(ClusterSettingsUpdate),
    responses=answers(ClusterAnswer, 400, 401, 403, 408, 413, 415),
)
async def put_cluster(request: Request, cp: Plane, user: Updater) -> dict[str, Any]:
    update = parse_model(ClusterSettingsUpdate, await read_json(request))
    name = await cp.state.cluster_name()
    if update.name is not None and update.name != name:
        raise InvalidSchema(
            f"name: the cluster is {name!r} and cannot be renamed (every certificate's "
            "SANs and every node's metrics carry the name)"
        )
    old, new = await cp.state.replace_settings(
        lambda current: parse_model(ClusterSettings, update.merged(current))
    )
    changes = changed_keys(old, new)
    if changes:
        await cp.state.add_event(SettingsEvent(cp.clock(), user.email, "settings", changes=changes))
    return _answer(name, new)


@router.get("/v1/cluster/alerts", responses=answers(dict[str, AlertAnswer], 401, 403))
async def get_alerts(cp: Plane, user: Viewer) -> dict[str, Any]:
    """Each certificate alert evaluated now (``change_time``: when it last flipped)."""
    return {name: state.as_json() for name, state in (await cp.lifecycle.current_alerts()).items()}


@router.get("/v1/cluster/control_planes", responses=answers(ControlPlanesAnswer, 401, 403, 503))
async def get_control_planes(cp: Plane, user: Viewer) -> dict[str, Any]:
    """Every control plane sharing the store: which leads, which answered lately."""
    return {"control_planes": await cp.leadership.control_planes() if cp.leadership else []}
