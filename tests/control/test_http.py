"""The HTTP edge in process (see inprocess.py: a real ControlPlane with zero nodes, no
sockets): authentication and permission come before every parameter and body check, and the one
error mapping answers 400/401/403/404/405/413/415 with the error body (DESIGN §4.2, §4.3)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from certfactory import CA
from fastapi.routing import APIRoute
from inprocess import ADMIN, MANAGER, VIEWER, InProcess, basic, in_process, run
from starlette.routing import BaseRoute

from clustercert.control.app import build_app

MALFORMED = b'{"name": "proxy", "certificate": '
BODY_ROUTES = [
    ("PUT", "/v1/cluster/update_cert"),
    ("PUT", "/v1/cluster/certificates"),
    ("POST", "/v1/cluster/certificates/validate"),
    ("POST", "/v1/cluster/certificates/rotate"),
    ("PUT", "/v1/cluster"),
]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[InProcess]:
    with in_process(tmp_path / "cluster") as made:
        yield made


def assert_error(response: httpx.Response, status: int, error_code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == error_code, body
    assert body["description"] == body["message"] != ""
    return dict(body)


def every_route() -> list[tuple[str, str]]:
    """Each method and path of the application, path parameters filled with "x" (malformed
    where they must be integers)."""
    routes: list[APIRoute] = []
    pending: list[BaseRoute] = list(build_app(None).routes)  # type: ignore[arg-type]
    while pending:
        route = pending.pop()
        if isinstance(route, APIRoute):
            routes.append(route)
        else:  # an included router (FastAPI keeps them nested)
            pending.extend(route.original_router.routes)  # type: ignore[attr-defined]
    return sorted(
        (method, re.sub(r"\{[^}]+\}", "x", route.path))
        for route in routes
        for method in route.methods
    )


def test_every_route_but_join_authenticates_before_parameters_and_body(api: InProcess) -> None:
    routes = every_route()
    # 16 certificate, node and meta routes, 4 cluster settings, alerts and control-plane
    # routes, 2 internal CA routes, 4 user routes
    assert len(routes) == 26
    before = api.snapshot()

    async def scenario() -> None:
        async with api.client(auth=None) as anonymous:
            for method, path in routes:
                response = await anonymous.request(
                    method, path + "?limit=x", content=MALFORMED,
                    headers={"Content-Type": "text/plain"},
                )  # fmt: skip
                if path == "/v1/internal/join":  # authenticated by its token, in the body
                    assert_error(response, 415, "unsupported_media_type")
                    continue
                if path == "/v1/internal/ca":  # the public CA certificate, for pinned joins
                    assert response.status_code == 200, response.text
                    continue
                assert_error(response, 401, "unauthorized")
                assert response.headers["WWW-Authenticate"] == 'Basic realm="clustercert"'

    run(scenario())
    assert api.snapshot() == before


@pytest.mark.parametrize(("method", "path"), [*BODY_ROUTES, ("POST", "/v1/users")])
def test_wrong_credentials_come_before_a_malformed_body_of_the_wrong_type(
    api: InProcess, method: str, path: str
) -> None:
    before = api.snapshot()

    async def scenario() -> httpx.Response:
        async with api.client(auth=(ADMIN[0], "wrong password")) as client:
            return await client.request(
                method, path, content=MALFORMED, headers={"Content-Type": "text/plain"}
            )

    body = assert_error(run(scenario()), 401, "unauthorized")
    assert body["description"] == "wrong username or password"
    assert api.snapshot() == before


@pytest.mark.parametrize(("method", "path"), [*BODY_ROUTES, ("POST", "/v1/users")])
def test_a_viewer_is_refused_before_its_malformed_body_is_read(
    api: InProcess, method: str, path: str
) -> None:
    before = api.snapshot()

    async def scenario() -> list[httpx.Response]:
        async with api.client(auth=VIEWER) as client:
            malformed = await client.request(
                method, path, content=MALFORMED, headers={"Content-Type": "application/json"}
            )
            untyped = await client.request(method, path, content=MALFORMED)
            return [malformed, untyped]

    for response in run(scenario()):
        body = assert_error(response, 403, "insufficient_permissions")
        assert "viewer@cluster.local (role cluster_viewer) lacks the permission" in body["message"]
    assert api.snapshot() == before


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_viewer_with_a_too_large_body_gets_403_not_413(
    api: InProcess, method: str, path: str
) -> None:
    before = api.snapshot()
    large = b'{"name": "' + b"x" * (1024 * 1024 + 1) + b'"}'

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        headers = {"Content-Type": "application/json"}
        async with api.client(auth=VIEWER) as viewer, api.client(auth=ADMIN) as admin:
            return (
                await viewer.request(method, path, content=large, headers=headers),
                await admin.request(method, path, content=large, headers=headers),
            )

    refused, too_large = run(scenario())
    assert_error(refused, 403, "insufficient_permissions")
    assert_error(too_large, 413, "payload_too_large")
    assert api.snapshot() == before


def test_body_checks_after_permission_in_order(api: InProcess) -> None:
    """Media type, then JSON, then schema: each answered with its own error code."""
    before = api.snapshot()

    async def scenario() -> list[httpx.Response]:
        async with api.client() as admin:
            path = "/v1/cluster/update_cert"
            return [
                await admin.put(path, content=MALFORMED, headers={"Content-Type": "text/plain"}),
                await admin.put(
                    path, content=MALFORMED, headers={"Content-Type": "application/json"}
                ),
                await admin.put(path, json={"name": "proxy", "certificate": "x", "extra": 1}),
                await admin.put(path, json={"name": "nope", "certificate": "x"}),
            ]

    media, json_error, schema, unknown = run(scenario())
    assert_error(media, 415, "unsupported_media_type")
    assert_error(json_error, 400, "invalid_json")
    assert (
        "extra: Extra inputs are not permitted"
        in assert_error(schema, 400, "invalid_schema")["message"]
    )
    assert_error(unknown, 403, "unknown_certificate")
    assert api.snapshot() == before


def test_duplicate_json_keys_are_refused(api: InProcess) -> None:
    """Issue #11: not "the last one wins" — a proxy or auditor could read the other value."""
    before = api.snapshot()
    leaf = CA.new().issue("proxy.cluster.local")
    pem, key = json.dumps(leaf.full_chain_pem), json.dumps(leaf.key_pem)
    twice = f'{{"name": "proxy", "certificate": {pem}, "key": {key}, "name": "cm"}}'.encode()
    nested = b'{"certificates": [{"name": "proxy", "certificate": "x", "certificate": "y"}]}'

    async def scenario() -> list[httpx.Response]:
        async with api.client() as admin:
            headers = {"Content-Type": "application/json"}
            return [
                await admin.put("/v1/cluster/update_cert", content=twice, headers=headers),
                await admin.put("/v1/cluster/certificates", content=nested, headers=headers),
            ]

    top, inner = run(scenario())
    assert "duplicate key 'name'" in assert_error(top, 400, "invalid_json")["message"]
    assert "duplicate key 'certificate'" in assert_error(inner, 400, "invalid_json")["message"]
    assert api.snapshot() == before


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=501", "limit"), ("limit=-3", "limit"), ("offset=-1", "offset")],
)
def test_out_of_range_paging_is_400_not_clamped(api: InProcess, query: str, field: str) -> None:
    before = api.snapshot()

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with api.client(auth=VIEWER) as viewer:
            path = "/v1/cluster/certificates/events"
            return await viewer.get(f"{path}?{query}"), await viewer.get(f"{path}?limit=500")

    refused, edge = run(scenario())
    body = assert_error(refused, 400, "invalid_schema")
    assert body["message"].startswith(f"invalid request parameter: query.{field}: ")
    assert edge.status_code == 200 and edge.json()["total"] == before["events"]
    assert api.snapshot() == before


def test_a_malformed_parameter_is_400_only_after_authentication_and_permission(
    api: InProcess,
) -> None:
    async def scenario() -> dict[str, httpx.Response]:
        async with (
            api.client(auth=None) as anonymous,
            api.client(auth=VIEWER) as viewer,
            api.client(auth=MANAGER) as manager,
        ):
            return {
                "anonymous node": await anonymous.get("/v1/nodes/abc"),
                "viewer node": await viewer.get("/v1/nodes/abc"),
                "viewer events": await viewer.get("/v1/cluster/certificates/events?limit=x"),
                "viewer user": await viewer.get("/v1/users/abc"),
                "manager user": await manager.delete("/v1/users/abc"),
            }

    answers = run(scenario())
    assert_error(answers["anonymous node"], 401, "unauthorized")
    node = assert_error(answers["viewer node"], 400, "invalid_schema")
    assert node["message"].startswith("invalid request parameter: path.node_id: ")
    events = assert_error(answers["viewer events"], 400, "invalid_schema")
    assert events["message"].startswith("invalid request parameter: query.limit: ")
    # The permission (manage_users) is checked before the parameter, as DESIGN §4.2 orders.
    assert_error(answers["viewer user"], 403, "insufficient_permissions")
    assert_error(answers["manager user"], 400, "invalid_schema")


def test_unknown_routes_and_methods_use_the_error_body(api: InProcess) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with api.client(auth=None) as anonymous:
            return (
                await anonymous.get("/v1/nothing-here"),
                await anonymous.request("PATCH", "/v1/nodes"),
            )

    missing, wrong_method = run(scenario())
    body = assert_error(missing, 404, "certificate_not_found")
    assert body["message"] == "no such endpoint: GET /v1/nothing-here"
    body = assert_error(wrong_method, 405, "method_not_allowed")
    assert body["message"] == "PATCH is not allowed on /v1/nodes"


def test_credentials_in_the_header_are_read_like_httpx_basic_auth(api: InProcess) -> None:
    async def scenario() -> httpx.Response:
        async with api.client(auth=None) as client:
            return await client.get("/v1/nodes", headers=basic(VIEWER))

    answer = run(scenario())
    assert answer.status_code == 200
    assert answer.json() == []
