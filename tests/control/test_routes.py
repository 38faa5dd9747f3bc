"""The certificate, node and user routes in process (see inprocess.py: a real ControlPlane with
zero nodes, so a rollout has no agent to reach and nothing stands in for one). The answers'
exact JSON (keys and their order) is what clients and docs/api.md rely on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from clusterkit import proxy_body
from inprocess import ADMIN, MANAGER, VIEWER, InProcess, in_process, run

SUMMARY = ["name", "generation", "fingerprint_sha256", "not_after", "warnings"]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[InProcess]:
    with in_process(tmp_path / "cluster") as made:
        yield made


def request(
    api: InProcess, method: str, path: str, body: Any = None, auth: tuple[str, str] = ADMIN
) -> httpx.Response:
    async def scenario() -> httpx.Response:
        async with api.client(auth=auth) as client:
            if body is None:
                return await client.request(method, path)
            return await client.request(method, path, json=body)

    return run(scenario())


def keys(response: httpx.Response) -> list[str]:
    """The answer's top-level keys in the order they were sent."""
    assert response.status_code == 200, response.text
    return list(json.loads(response.text))


def test_get_certificates_shows_keys_to_admins_only(api: InProcess) -> None:
    admin = request(api, "GET", "/v1/cluster/certificates").json()
    viewer = request(api, "GET", "/v1/cluster/certificates", auth=VIEWER).json()
    names = {r.name for r in run(api.state.certificates())}
    assert set(admin) == {f"{n}_cert" for n in names} | {f"{n}_key" for n in names}
    assert set(viewer) == {f"{n}_cert" for n in names}
    assert all(value.startswith("-----BEGIN ") for value in admin.values())


def test_get_one_certificate_and_the_unknown_or_unset_ones(api: InProcess) -> None:
    answer = request(api, "GET", "/v1/cluster/certificates/api", auth=VIEWER)
    assert keys(answer) == [
        "name", "generation", "source", "subject", "issuer", "fingerprint_sha256", "not_after",
        "updated_at", "updated_by", "nodes",
    ]  # fmt: skip
    record = run(api.state.certificate("api"))
    assert record is not None
    body = answer.json()
    assert (body["generation"], body["fingerprint_sha256"], body["nodes"]) == (
        record.generation, record.fingerprint, []
    )  # fmt: skip
    assert body["subject"] == "CN=api.cluster.local"
    unknown = request(api, "GET", "/v1/cluster/certificates/nope")
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, "certificate_not_found")
    unset = request(api, "GET", "/v1/cluster/certificates/mtls_trusted_ca")
    assert (unset.status_code, unset.json()["message"]) == (404, "mtls_trusted_ca is not set")


def test_validate_answers_every_check_and_changes_nothing(api: InProcess) -> None:
    body, fingerprint = proxy_body()
    before = api.snapshot()
    answer = request(api, "POST", "/v1/cluster/certificates/validate", body)
    assert keys(answer) == ["valid", "certificates"]
    (item,) = answer.json()["certificates"]
    assert list(item) == [
        "subject", "issuer", "sans", "not_before", "not_after", "fingerprint_sha256", "key_type",
        "key_bits", "chain_length", "name", "warnings",
    ]  # fmt: skip
    assert (item["name"], item["fingerprint_sha256"], item["chain_length"]) == (
        "proxy", fingerprint, 2
    )  # fmt: skip
    empty = request(api, "POST", "/v1/cluster/certificates/validate", {"certificates": []})
    assert (empty.status_code, empty.json()["error_code"]) == (400, "invalid_schema")
    viewer = request(api, "POST", "/v1/cluster/certificates/validate", body, auth=VIEWER)
    assert (viewer.status_code, viewer.json()["error_code"]) == (403, "insufficient_permissions")
    assert api.snapshot() == before


def test_update_cert_with_no_nodes_answers_the_rollout_shape(api: InProcess) -> None:
    body, fingerprint = proxy_body()
    single = request(api, "PUT", "/v1/cluster/update_cert", body)
    assert keys(single) == [*SUMMARY, "nodes"]
    assert single.json()["fingerprint_sha256"] == fingerprint
    assert single.json()["nodes"] == []
    again = request(api, "PUT", "/v1/cluster/certificates", {"certificates": [body]})
    assert keys(again) == ["certificates", "nodes"]
    assert list(again.json()["certificates"][0]) == SUMMARY
    # Idempotent: the same upload is the same generation (DESIGN §6).
    assert again.json()["certificates"][0]["generation"] == single.json()["generation"]
    record = run(api.state.certificate("proxy"))
    assert record is not None and record.fingerprint == fingerprint


def test_rotate_answers_without_warnings(api: InProcess) -> None:
    before = run(api.state.certificate("syncer"))
    answer = request(api, "POST", "/v1/cluster/certificates/rotate", {"name": "syncer"})
    assert keys(answer) == ["certificates", "nodes"]
    (item,) = answer.json()["certificates"]
    assert list(item) == ["name", "generation", "fingerprint_sha256", "not_after"]
    assert before is not None and item["generation"] == before.generation + 1


def test_delete_refuses_required_and_unknown_names(api: InProcess) -> None:
    before = api.snapshot()
    required = request(api, "DELETE", "/v1/cluster/certificates/api")
    assert (required.status_code, required.json()["error_code"]) == (403, "required_certificate")
    unknown = request(api, "DELETE", "/v1/cluster/certificates/nope")
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, "certificate_not_found")
    assert api.snapshot() == before


def test_nodes_rollout_and_events_with_no_nodes(api: InProcess) -> None:
    assert request(api, "GET", "/v1/nodes", auth=VIEWER).json() == []
    missing = request(api, "GET", "/v1/nodes/1", auth=VIEWER)
    assert (missing.status_code, missing.json()["message"]) == (404, "no node with id 1")
    progress = request(api, "GET", "/v1/cluster/certificates/rollout", auth=VIEWER)
    assert progress.json() == {"in_progress": False}
    events = request(api, "GET", "/v1/cluster/certificates/events?limit=1", auth=VIEWER)
    assert keys(events) == ["total", "events"]
    assert events.json()["total"] == len(run(api.state.events()))
    assert len(events.json()["events"]) == min(1, events.json()["total"])


def test_user_answers_show_a_subject_only_for_certificate_users(api: InProcess) -> None:
    regular = request(
        api, "POST", "/v1/users",
        {"email": "ops@example.com", "password": "long enough", "role": "db_viewer"},
        auth=MANAGER,
    )  # fmt: skip
    assert keys(regular) == ["uid", "email", "name", "role", "auth_method"]
    certificate = request(
        api, "POST", "/v1/users",
        {"email": "bot@example.com", "role": "db_viewer", "auth_method": "certificate",
         "certificate_subject_line": "CN=bot, O=Example"},
        auth=MANAGER,
    )  # fmt: skip
    assert certificate.json()["certificate_subject_line"] == "CN=bot,O=Example"
    listed = request(api, "GET", "/v1/users", auth=MANAGER).json()
    assert [u["email"] for u in listed] == [
        ADMIN[0], VIEWER[0], MANAGER[0], "ops@example.com", "bot@example.com"
    ]  # fmt: skip
    assert all("password_hash" not in u for u in listed)
    uid = regular.json()["uid"]
    assert request(api, "GET", f"/v1/users/{uid}", auth=MANAGER).json() == regular.json()
    assert request(api, "DELETE", f"/v1/users/{uid}", auth=MANAGER).json() == regular.json()
    gone = request(api, "GET", f"/v1/users/{uid}", auth=MANAGER)
    assert (gone.status_code, gone.json()["error_code"]) == (404, "not_found")


def test_a_conditional_update_is_refused_when_the_certificate_moved(api: InProcess) -> None:
    """Optimistic concurrency (issue #11): the caller sends the generation it read, in the
    body (``expected_generation``) or as ``If-Match`` (the ETag of GET); 409
    generation_mismatch, nothing changed, when someone else replaced it since."""
    read = request(api, "GET", "/v1/cluster/certificates/proxy")
    seen = read.json()["generation"]
    assert read.headers["ETag"] == f'"{seen}"'
    first, _ = proxy_body()
    ok = request(api, "PUT", "/v1/cluster/update_cert", {**first, "expected_generation": seen})
    assert ok.status_code == 200, ok.text
    moved = ok.json()["generation"]
    # A retry of the same upload with the same (now stale) generation is not a conflict.
    again = request(api, "PUT", "/v1/cluster/update_cert", {**first, "expected_generation": seen})
    assert (again.status_code, again.json()["generation"]) == (200, moved)
    before = api.snapshot()

    second, _ = proxy_body()

    async def conditional(headers: dict[str, str], body: Any) -> httpx.Response:
        async with api.client() as client:
            return await client.put("/v1/cluster/update_cert", json=body, headers=headers)

    stale_body = request(
        api, "PUT", "/v1/cluster/update_cert", {**second, "expected_generation": seen}
    )
    stale_header = run(conditional({"If-Match": f'"{seen}"'}, second))
    batch = request(
        api, "PUT", "/v1/cluster/certificates",
        {"certificates": [{**second, "expected_generation": seen}]},
    )  # fmt: skip
    for response in (stale_body, stale_header, batch):
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["error_code"] == "generation_mismatch"
        assert body["description"] == (
            f"proxy is at generation {moved}, not {seen} as expected: it changed since it was "
            "read; read it again and decide"
        )
    bad = run(conditional({"If-Match": "*"}, second))
    assert (bad.status_code, bad.json()["error_code"]) == (400, "invalid_schema")
    assert api.snapshot() == before
    current = run(conditional({"If-Match": f'"{moved}"'}, second))
    assert current.status_code == 200, current.text
    assert current.json()["generation"] > moved
