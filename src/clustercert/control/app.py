"""The REST API (DESIGN §4): one FastAPI application made of one router per resource
(:mod:`clustercert.control.routes`), the shared edge (:mod:`clustercert.control.http`: who may
call, bodies, the one error mapping) and the answers (:mod:`clustercert.control.answers`)."""

from __future__ import annotations

from fastapi import FastAPI

from clustercert.control.http import install_error_handlers
from clustercert.control.plane import ControlPlane
from clustercert.control.routes import ca, certificates, cluster, meta, nodes, users

__all__ = ["build_app"]


def build_app(cp: ControlPlane) -> FastAPI:
    """The API application serving ``cp``; routes find it with the ``control_plane``
    dependency."""
    # The OpenAPI document is served by an authenticated route (routes/meta.py), like every
    # endpoint; no interactive docs.
    app = FastAPI(
        title="clustercert", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.control_plane = cp
    install_error_handlers(app)
    for module in (meta, certificates, cluster, ca, nodes, users):
        app.include_router(module.router)
    return app
