"""Security baseline (DESIGN §8) against a real cluster of its own: who may call what, users,
failed-login throttling, client-certificate login, keys at rest, and a final grep proving that
no private key reached a log, an event, an error body or the CLI's output.

The module's cluster is its own (the matrix changes certificates, users and the throttle), with
one node: what is checked here is the API's door, not the rollout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import stat
import time
from asyncio import run
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from certfactory import CA, Leaf, cert_pem, key_pem
from clusterkit import api, wait_until
from conftest import start_cluster
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustercert.cli import main
from clustercert.control.auth import _DUMMY_HASH, hash_password
from clustercert.control.state import ClusterState
from clustercert.demo import ADMIN_EMAIL, DemoCluster
from clustercert.errors import ConfigError, UndeletableUser
from clustercert.roles import ROLES
from clustercert.sealing import KeySealer
from clustercert.store import open_store

PASSWORDS = {role: f"pw-{role}-Secret!" for role in ROLES}
TARGET = "target@sec.test"  # the account the wrong-password column guesses at

# Everything the tests saw come back from the API or the CLI, for the final grep; and every key
# they uploaded.
SEEN: list[str] = []
UPLOADED_KEYS: list[str] = []


def email_of(role: str) -> str:
    return f"{role}@sec.test"


@dataclass
class Ctx:
    cluster: DemoCluster
    tmp: Path
    uids: dict[str, int] = field(default_factory=dict)

    def client(self, auth: tuple[str, str] | None) -> httpx.Client:
        return api(self.cluster, auth)

    def admin(self) -> httpx.Client:
        return api(self.cluster)

    def request(
        self, auth: tuple[str, str] | None, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        with self.client(auth) as client:
            response = client.request(method, path, json=body)
        SEEN.append(response.text)
        return response


def _leaf(cn: str = "redis.example", eku: tuple[str, ...] = ("serverAuth",)) -> Leaf:
    leaf = CA.new().issue(cn, sans=[cn, "127.0.0.1"], eku=list(eku))
    UPLOADED_KEYS.append(leaf.key_pem)
    return leaf


def _item(name: str = "proxy", eku: tuple[str, ...] = ("serverAuth",)) -> dict[str, str]:
    leaf = _leaf(eku=eku)
    return {"name": name, "certificate": leaf.full_chain_pem, "key": leaf.key_pem}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    cluster = start_cluster(tmp_path_factory, 1)
    context = Ctx(cluster, tmp_path_factory.mktemp("security"))
    try:
        with context.admin() as admin:
            for role in ROLES:
                answer = admin.post(
                    "/v1/users",
                    json={"email": email_of(role), "password": PASSWORDS[role], "role": role},
                )
                assert answer.status_code == 200, answer.text
                context.uids[role] = answer.json()["uid"]
            target = {"email": TARGET, "password": "never-guessed-1", "role": "admin"}
            assert admin.post("/v1/users", json=target).status_code == 200
        yield context
    finally:
        cluster.stop()


# --- the authorization matrix ----------------------------------------------------------------

PRINCIPALS = ["no credentials", "wrong password", *ROLES]


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    """The path as the OpenAPI document names it; ``{...}`` filled from ``values``."""
    needs: str  # "view", "update", "users", "token" or "public"
    body: Callable[[Ctx], Any] = lambda ctx: None
    values: Callable[[Ctx], dict[str, Any]] = lambda ctx: {}
    prepare: Callable[[Ctx], Any] = lambda ctx: None
    """Run (as admin) before a call that is expected to succeed."""
    ok: int = 200
    """The status of a permitted call."""
    after: Callable[[Ctx], Any] = lambda ctx: None
    """Run (as admin) after a permitted call: wait for what it started."""

    def path(self, ctx: Ctx) -> str:
        return self.template.format(**self.values(ctx))


def _throwaway_user(ctx: Ctx) -> None:
    email = f"throwaway-{time.monotonic_ns()}@sec.test"
    with ctx.admin() as admin:
        answer = admin.post(
            "/v1/users", json={"email": email, "password": "throwaway-pw", "role": "db_viewer"}
        )
    assert answer.status_code == 200, answer.text
    ctx.uids["throwaway"] = answer.json()["uid"]


def _set_ldap_client(ctx: Ctx) -> None:
    with ctx.admin() as admin:
        answer = admin.put("/v1/cluster/update_cert", json=_item("ldap_client", ("clientAuth",)))
    assert answer.status_code == 200, answer.text


def _new_user(ctx: Ctx) -> dict[str, str]:
    email = f"new-{time.monotonic_ns()}@sec.test"
    return {"email": email, "password": "new-user-pw", "role": "cluster_viewer", "name": "New"}


def _spare_node(ctx: Ctx) -> None:
    """A node record to remove (nothing answers at its address; it exists only until the
    DELETE that follows)."""
    store = open_store(ctx.cluster.cluster.settings()["store"])
    try:
        node = run(
            ctx.cluster.cluster.state(store).add_node(
                f"spare-{time.monotonic_ns()}", "https://127.0.0.1:1", dt.datetime.now(dt.UTC)
            )
        )
    finally:
        store.close()
    ctx.uids["spare_node"] = node.node_id


def _ca_rotated(ctx: Ctx) -> None:
    """Until the internal CA rotation the call started is done (it changes the cluster's CA
    files, which every later call of this module reads again)."""

    def done() -> bool:
        with ctx.admin() as admin:
            return bool(admin.get("/v1/cluster/ca").json()["phase"] == "done")

    wait_until(done, timeout=180, interval=0.5, what="the internal CA rotation to finish")


_JOIN = {"token": "not-a-token", "name": "rogue", "agent_url": "https://127.0.0.1:1", "csr": "x"}

ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/v1/cluster/certificates", "view"),
    Endpoint("GET", "/v1/cluster/certificates/{name}", "view", values=lambda c: {"name": "proxy"}),
    Endpoint("GET", "/v1/cluster/certificates/events", "view"),
    Endpoint("GET", "/v1/cluster/certificates/rollout", "view"),
    Endpoint("GET", "/v1/nodes", "view"),
    Endpoint("GET", "/v1/nodes/{node_id}", "view", values=lambda c: {"node_id": 1}),
    Endpoint(
        "DELETE",
        "/v1/nodes/{node_id}",
        "update",
        values=lambda c: {"node_id": c.uids.get("spare_node", 999_999)},
        prepare=_spare_node,
    ),
    Endpoint("POST", "/v1/cluster/certificates/validate", "update", lambda c: _item()),
    Endpoint("PUT", "/v1/cluster/update_cert", "update", lambda c: _item()),
    Endpoint("PUT", "/v1/cluster/certificates", "update", lambda c: {"certificates": [_item()]}),
    Endpoint(
        "POST", "/v1/cluster/certificates/rotate", "update", lambda c: {"name": "metrics_exporter"}
    ),
    Endpoint(
        "DELETE",
        "/v1/cluster/certificates/{name}",
        "update",
        values=lambda c: {"name": "ldap_client"},
        prepare=_set_ldap_client,
    ),
    Endpoint("POST", "/v1/users", "users", _new_user),
    Endpoint("GET", "/v1/users", "users"),
    Endpoint("GET", "/v1/users/{uid}", "users", values=lambda c: {"uid": c.uids["db_viewer"]}),
    Endpoint(
        "DELETE",
        "/v1/users/{uid}",
        "users",
        values=lambda c: {"uid": c.uids.get("throwaway", 999_999)},
        prepare=_throwaway_user,
    ),
    Endpoint("POST", "/v1/internal/join", "token", lambda c: _JOIN),
    Endpoint("GET", "/v1/internal/ca", "public"),
    Endpoint("GET", "/v1/cluster", "view"),
    Endpoint(
        "PUT",
        "/v1/cluster",
        "update",
        lambda c: {"cert_rotation_job_settings": {"expiry_days_before_rotation": 60}},
    ),
    Endpoint("GET", "/v1/cluster/alerts", "view"),
    Endpoint("GET", "/v1/cluster/control_planes", "view"),
    Endpoint("GET", "/v1/cluster/ca", "view"),
    Endpoint("POST", "/v1/cluster/ca/rotate", "update", ok=202, after=_ca_rotated),
]

PERMITTED = {
    "view": set(ROLES),
    "update": {"admin"},
    "users": {"admin", "user_manager"},
    "token": set(),
    "public": set(ROLES),
}


def expected_status(endpoint: Endpoint, principal: str) -> int:
    if endpoint.needs == "public":
        return 200  # the cluster CA: anyone may read it, with or without credentials
    if principal in ("no credentials", "wrong password") or endpoint.needs == "token":
        return 401
    return endpoint.ok if principal in PERMITTED[endpoint.needs] else 403


def _auth(principal: str) -> tuple[str, str] | None:
    if principal == "no credentials":
        return None
    if principal == "wrong password":
        return (TARGET, "wrong-password")
    return (email_of(principal), PASSWORDS[principal])


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e.method} {e.template}")
def test_authorization_matrix(ctx: Ctx, endpoint: Endpoint, principal: str) -> None:
    expected = expected_status(endpoint, principal)
    permitted = expected == endpoint.ok
    if permitted:
        endpoint.prepare(ctx)
    response = ctx.request(
        _auth(principal), endpoint.method, endpoint.path(ctx), endpoint.body(ctx)
    )
    if permitted:
        endpoint.after(ctx)

    assert response.status_code == expected, response.text
    body = response.json()
    if not permitted:
        code = {401: "unauthorized", 403: "insufficient_permissions"}[expected]
        assert body["error_code"] == code
        assert body["description"] == body["message"]
        if expected == 401:
            assert response.headers["www-authenticate"].startswith("Basic")
    keys = [k for k in body if k.endswith("_key")] if isinstance(body, dict) else []
    if (endpoint.method, endpoint.template, principal) == (
        "GET",
        "/v1/cluster/certificates",
        "admin",
    ):
        assert {"proxy_key", "api_key"} <= set(keys)
    else:
        assert keys == []
        assert "PRIVATE KEY" not in response.text


def test_the_matrix_covers_every_documented_endpoint(ctx: Ctx) -> None:
    with ctx.admin() as admin:
        document = admin.get("/openapi.json").json()
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert documented == {(e.method, e.template) for e in ENDPOINTS}
    assert len(ENDPOINTS) * len(PRINCIPALS) == 192


# --- users -----------------------------------------------------------------------------------


def test_a_user_manager_cannot_make_or_remove_an_admin(ctx: Ctx) -> None:
    manager = (email_of("user_manager"), PASSWORDS["user_manager"])
    body = {"email": "would-be-admin@sec.test", "password": "escalate-me", "role": "admin"}
    refused = ctx.request(manager, "POST", "/v1/users", body)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error_code"] == "insufficient_permissions"
    assert "only an admin" in refused.json()["description"]
    removal = ctx.request(manager, "DELETE", f"/v1/users/{ctx.uids['admin']}")
    assert removal.status_code == 403
    listed = ctx.request(manager, "GET", "/v1/users").json()
    assert "would-be-admin@sec.test" not in {u["email"] for u in listed}
    assert ctx.uids["admin"] in {u["uid"] for u in listed}


def test_nobody_deletes_the_user_they_are_logged_in_as(ctx: Ctx) -> None:
    manager = (email_of("user_manager"), PASSWORDS["user_manager"])
    response = ctx.request(manager, "DELETE", f"/v1/users/{ctx.uids['user_manager']}")
    assert response.status_code == 409
    assert response.json()["error_code"] == "undeletable_user"


def test_the_last_admin_cannot_be_deleted(tmp_path: Path) -> None:
    with open_store(f"sqlite://{tmp_path / 'store.db'}") as store:
        store.put("meta/cluster", json.dumps({"name": "t"}), expect_revision=0)
        state = ClusterState(store, KeySealer.create(tmp_path / "cluster.key"))
        first = run(state.create_user("a@t", "A", "admin", "x"))
        second = run(state.create_user("b@t", "B", "admin", "x"))
        viewer = run(state.create_user("v@t", "V", "cluster_viewer", "x"))
        assert run(state.delete_user(first.uid)) == first
        with pytest.raises(UndeletableUser, match="last admin"):
            run(state.delete_user(second.uid))
        assert run(state.delete_user(viewer.uid)) == viewer
        assert run(state.delete_user(viewer.uid)) is None
        assert [u.email for u in run(state.users())] == ["b@t"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"email": "x@sec.test", "role": "admin"}, "password: required"),
        ({"email": "x@sec.test", "password": "short", "role": "admin"}, "password"),
        ({"email": "x@sec.test", "password": "long-enough", "role": "root"}, "role"),
        ({"email": "x:y@sec.test", "password": "long-enough", "role": "db_viewer"}, "email"),
        ({"email": "nobody", "password": "long-enough", "role": "db_viewer"}, "email"),
        (
            {"email": "x@sec.test", "password": "long-enough", "role": "db_viewer", "x": 1},
            "extra",
        ),
        (
            {
                "email": "x@sec.test",
                "password": "long-enough",
                "role": "db_viewer",
                "auth_method": "certificate",
                "certificate_subject_line": "CN=x",
            },
            "without a password",
        ),
        (
            {
                "email": "x@sec.test",
                "role": "db_viewer",
                "auth_method": "certificate",
                "certificate_subject_line": "this is no DN",
            },
            "RFC 2253",
        ),
    ],
)
def test_bad_user_bodies_are_400(ctx: Ctx, body: dict[str, Any], match: str) -> None:
    response = ctx.request(
        (ADMIN_EMAIL, str(ctx.cluster.admin_password)), "POST", "/v1/users", body
    )
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "invalid_schema"
    assert match.lower() in response.json()["description"].lower()


def test_users_lifecycle_is_audited_and_never_shows_a_hash(ctx: Ctx) -> None:
    admin = (ADMIN_EMAIL, str(ctx.cluster.admin_password))
    body = {"email": "Life@Sec.Test", "password": "lifecycle-pw", "role": "db_member", "name": "L"}
    created = ctx.request(admin, "POST", "/v1/users", body)
    assert created.status_code == 200, created.text
    user = created.json()
    assert user == {"uid": user["uid"], "email": "life@sec.test", "name": "L",
                    "role": "db_member", "auth_method": "regular"}  # fmt: skip
    again = ctx.request(admin, "POST", "/v1/users", body)
    assert again.status_code == 409
    assert again.json()["error_code"] == "user_exists"
    assert ctx.request(("life@sec.test", "lifecycle-pw"), "GET", "/v1/nodes").status_code == 200

    listed = ctx.request(admin, "GET", "/v1/users")
    assert "scrypt" not in listed.text and "password" not in listed.text
    deleted = ctx.request(admin, "DELETE", f"/v1/users/{user['uid']}")
    assert deleted.status_code == 200
    # At once, although the login was just cached.
    assert ctx.request(("life@sec.test", "lifecycle-pw"), "GET", "/v1/nodes").status_code == 401
    assert ctx.request(admin, "GET", f"/v1/users/{user['uid']}").status_code == 404

    events = ctx.request(admin, "GET", "/v1/cluster/certificates/events?limit=500").json()
    mine = [e for e in events["events"] if e.get("email") == "life@sec.test"]
    assert [e["action"] for e in mine] == ["user_delete", "user_create"]
    assert all(e["who"] == ADMIN_EMAIL and e["uid"] == user["uid"] for e in mine)
    assert "lifecycle-pw" not in json.dumps(events)


def test_passwords_are_stored_as_salted_scrypt_hashes(ctx: Ctx) -> None:
    with ctx.cluster.cluster.open_store() as store:
        records = [json.loads(e.value) for e in store.list("users/")]
    hashes_ = [r["password_hash"] for r in records if r["auth_method"] == "regular"]
    assert hashes_ and all(h.startswith("scrypt$16384$8$1$") for h in hashes_)
    assert len(set(hashes_)) == len(hashes_)
    assert hash_password("same") != hash_password("same")  # salted
    raw = (ctx.cluster.directory / "store.db").read_bytes()
    assert all(p.encode() not in raw for p in PASSWORDS.values())


# --- failed logins -----------------------------------------------------------------------------


def _login(ctx: Ctx, email: str, password: str) -> httpx.Response:
    return ctx.request((email, password), "GET", "/v1/nodes")


def test_repeated_failures_are_slowed_down_and_logged_alike_for_unknown_users(ctx: Ctx) -> None:
    with ctx.admin() as admin:
        created = admin.post(
            "/v1/users", json={"email": "slow@sec.test", "password": "slow-but-right", "role":
                               "db_viewer"},
        )  # fmt: skip
    assert created.status_code == 200
    answers: dict[str, list[str]] = {"slow@sec.test": [], "ghost@sec.test": []}
    for email, seen in answers.items():
        for _ in range(5):
            seen.append(_login(ctx, email, "guess").json()["description"])
        # The right password does not help while the account is throttled.
        seen.append(_login(ctx, email, "slow-but-right").json()["description"])
    assert answers["slow@sec.test"] == answers["ghost@sec.test"]  # no enumeration
    assert answers["slow@sec.test"][:5] == ["wrong username or password"] * 5
    assert answers["slow@sec.test"][5].startswith("too many failed logins")

    time.sleep(1.1)  # the first delay is 1 s
    assert _login(ctx, "slow@sec.test", "slow-but-right").status_code == 200
    assert _login(ctx, "slow@sec.test", "guess").json()["description"] == (
        "wrong username or password"  # a success cleared the account's record
    )
    log = (ctx.cluster.directory / "logs" / "server.log").read_text()
    assert "failed login for 'slow@sec.test' from 127.0.0.1" in log
    assert "failed login for 'ghost@sec.test' from 127.0.0.1" in log
    assert "refused without a check" in log
    assert "guess" not in log and "slow-but-right" not in log


def test_an_outsider_guessing_from_elsewhere_does_not_lock_the_user_out(ctx: Ctx) -> None:
    """Issue #11: failures from one address (127.0.0.2) slow that address down but never
    refuse the account's correct password from another address (127.0.0.1)."""
    with ctx.admin() as admin:
        created = admin.post(
            "/v1/users", json={"email": "victim@sec.test", "password": "victim-right",
                               "role": "db_viewer"},
        )  # fmt: skip
    assert created.status_code == 200
    verify = ssl.create_default_context(cafile=str(ctx.cluster.cluster.ca_file))
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=verify)
    with httpx.Client(base_url=ctx.cluster.api_url, transport=transport, timeout=60) as outsider:
        answers = [
            outsider.get("/v1/nodes", auth=("victim@sec.test", f"guess{i}")) for i in range(8)
        ]
        assert [a.status_code for a in answers] == [401] * 8
        texts = [a.json()["description"] for a in answers]
        assert texts[:5] == ["wrong username or password"] * 5
        assert all(t.startswith("too many failed logins from this address") for t in texts[5:])
        # The outsider stays delayed even with the right password.
        late = outsider.get("/v1/nodes", auth=("victim@sec.test", "victim-right"))
        assert late.status_code == 401 and late.json()["error_code"] == "unauthorized"
    # The user, from its own address and never logged in before (nothing cached): let in.
    assert ctx.request(("victim@sec.test", "victim-right"), "GET", "/v1/nodes").status_code == 200
    log = (ctx.cluster.directory / "logs" / "server.log").read_text()
    assert "failed login for 'victim@sec.test' from 127.0.0.2" in log
    assert "victim-right" not in log


def test_unknown_and_known_users_cost_the_same(ctx: Ctx) -> None:
    """Both get the same answer, and both pay one scrypt run with the same parameters: an
    unknown user is checked against a dummy hash made like every stored one. (Proven by the
    parameters, not by timing, which a shared machine would make flaky.)"""
    roles = ("cluster_member", "cluster_viewer", "db_member", "db_viewer", "user_manager")
    for email in [email_of(role) for role in roles] + ["nobody@sec.test"]:
        response = _login(ctx, email, "not-the-password")
        assert response.json()["description"] == "wrong username or password"
    assert _DUMMY_HASH.split("$")[:4] == hash_password("x").split("$")[:4]


# --- client-certificate login --------------------------------------------------------------


def _client_leaf(ca: CA, subject: x509.Name, eku: x509.ObjectIdentifier) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem_key = key_pem(key)
    UPLOADED_KEYS.append(pem_key)
    return cert_pem(cert), pem_key


def _subject(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert_client(ctx: Ctx, name: str, pair: tuple[str, str]) -> httpx.Client:
    cert_file, key_file = ctx.tmp / f"{name}.pem", ctx.tmp / f"{name}.key"
    cert_file.write_text(pair[0])
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(pair[1])
    return api(ctx.cluster, None, client_cert=(cert_file, key_file))


def test_client_certificate_login(ctx: Ctx) -> None:
    trusted, other = CA.new(), CA.new()
    robot = _client_leaf(trusted, _subject("robot"), ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _client_leaf(trusted, _subject("stranger"), ExtendedKeyUsageOID.CLIENT_AUTH)
    forged = _client_leaf(other, _subject("robot"), ExtendedKeyUsageOID.CLIENT_AUTH)
    server_only = _client_leaf(trusted, _subject("robot"), ExtendedKeyUsageOID.SERVER_AUTH)
    admin = (ADMIN_EMAIL, str(ctx.cluster.admin_password))
    user = {"email": "robot@sec.test", "role": "cluster_viewer", "auth_method": "certificate",
            "certificate_subject_line": "CN=robot, O=Example, C=US"}  # fmt: skip

    created = ctx.request(admin, "POST", "/v1/users", user)
    assert created.status_code == 200, created.text
    assert created.json()["certificate_subject_line"] == "CN=robot,O=Example,C=US"
    # Before mtls_trusted_ca is set, nothing vouches for any client certificate.
    with _cert_client(ctx, "robot-early", robot) as early, pytest.raises(httpx.HTTPError):
        early.get("/v1/nodes")

    put = ctx.request(
        admin, "PUT", "/v1/cluster/update_cert",
        {"name": "mtls_trusted_ca", "certificate": trusted.cert_pem},
    )  # fmt: skip
    assert put.status_code == 200, put.text
    try:
        with _cert_client(ctx, "robot", robot) as client:
            listed = client.get("/v1/cluster/certificates")
            assert listed.status_code == 200, listed.text
            assert not [k for k in listed.json() if k.endswith("_key")]
            refused = client.put("/v1/cluster/update_cert", json=_item())
            assert refused.status_code == 403  # a cluster_viewer, by certificate
            # A password user cannot be logged in as by certificate, nor the reverse.
            assert client.get("/v1/nodes", auth=("robot@sec.test", "")).status_code == 401

            with _cert_client(ctx, "stranger", stranger) as other_subject:
                answer = other_subject.get("/v1/nodes")
                assert answer.status_code == 401
                assert "CN=stranger,O=Example,C=US" in answer.json()["description"]
            for name, pair in (("forged", forged), ("server-only", server_only)):
                with _cert_client(ctx, name, pair) as refused, pytest.raises(httpx.HTTPError):
                    refused.get("/v1/nodes")

            deleted = ctx.request(admin, "DELETE", "/v1/cluster/certificates/mtls_trusted_ca")
            assert deleted.status_code == 200, deleted.text
            # The same kept-alive connection is refused once the bundle is gone.
            after = client.get("/v1/nodes")
            assert after.status_code == 401
            assert "client-certificate login is off" in after.json()["description"]
    finally:
        with ctx.admin() as cleanup:
            cleanup.delete("/v1/cluster/certificates/mtls_trusted_ca")
            created_uid = created.json()["uid"]
            cleanup.delete(f"/v1/users/{created_uid}")


# --- keys at rest and on nodes -----------------------------------------------------------------


def test_keys_are_sealed_in_the_store_and_the_cluster_key_is_private(ctx: Ctx) -> None:
    directory = ctx.cluster.cluster
    for private in (directory.cluster_key_file, directory.ca_key_file, directory.identity_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    with directory.open_store() as store:
        records = [json.loads(e.value) for e in store.list("certs/")]
    keyed = [r for r in records if r["key_sealed"]]
    assert len(keyed) >= 7
    assert all(r["key_sealed"].startswith("aesgcm:") for r in keyed)
    assert all("PRIVATE KEY" not in json.dumps(r) for r in records)

    sealer = KeySealer.load(directory.cluster_key_file)
    proxy = next(r for r in keyed if r["name"] == "proxy")
    assert "PRIVATE KEY" in sealer.open(proxy["key_sealed"], "certs/proxy")
    with pytest.raises(ConfigError, match="does not decrypt"):
        sealer.open(proxy["key_sealed"], "certs/api")  # bound to its record
    with pytest.raises(ConfigError, match="does not decrypt"):
        KeySealer(os.urandom(32)).open(proxy["key_sealed"], "certs/proxy")


def test_node_key_files_are_0600_in_0700_directories_owned_by_the_agent(ctx: Ctx) -> None:
    node_dir = ctx.cluster.nodes[0].directory
    keys = list(node_dir.rglob("key.pem"))
    assert len(keys) >= 8  # every keyed certificate, and the node's identity
    for key in keys:
        info = key.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, key
        assert info.st_uid == os.getuid()
    for directory in [node_dir / "identity", node_dir / "certs", *(node_dir / "certs").rglob("*")]:
        if directory.is_dir():
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
            assert directory.stat().st_uid == os.getuid()


# --- the CLI -----------------------------------------------------------------------------------


def test_users_cli(
    ctx: Ctx, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables unwrapped
    login = ["--url", ctx.cluster.api_url, "--user", ADMIN_EMAIL,
             "--password", str(ctx.cluster.admin_password),
             "--ca-file", str(ctx.cluster.cluster.ca_file)]  # fmt: skip

    def run(*args: str) -> tuple[int, str]:
        code = main([*args, *login])
        out = capsys.readouterr()
        SEEN.append(out.out + out.err)
        return code, out.out + out.err

    code, out = run("users", "add", "--email", "cli@sec.test", "--role", "db_viewer",
                    "--new-password", "cli-password-1")  # fmt: skip
    assert code == 0, out
    uid = int(re.search(r"created user (\d+): cli@sec.test", out).group(1))  # type: ignore[union-attr]
    code, out = run("users", "add", "--email", "cli-robot@sec.test", "--role", "db_viewer",
                    "--certificate-subject-line", "CN=cli robot")  # fmt: skip
    assert code == 0, out
    code, out = run("users", "list")
    assert code == 0 and "cli@sec.test" in out and "certificate (CN=cli robot)" in out
    assert "scrypt" not in out
    code, out = run("users", "delete", str(uid))
    assert code == 0 and f"deleted user {uid}: cli@sec.test" in out
    code, out = run("users", "delete", str(uid))
    assert code == 5 and "not_found" in out
    code, out = run("users", "add", "--email", "cli@sec.test", "--role", "root",
                    "--new-password", "x")  # fmt: skip
    assert code == 2
    for args in (["certificates", "list"], ["certificates", "show", "proxy"]):
        code, out = run(*args)
        assert code == 0, out
    code = main(["users", "list", *login[:3], "wrong@sec.test", *login[4:]])
    out = capsys.readouterr()
    assert code == 3 and "unauthorized" in out.err


# --- the grep, after everything above ------------------------------------------------------


def _key_fragments(pem: str) -> list[str]:
    """The base64 lines of a PEM key: any of them in a text means key material leaked."""
    lines = [line.strip() for line in pem.splitlines() if line and not line.startswith("-----")]
    return [line for line in lines if len(line) >= 40]


def test_no_private_key_material_in_logs_events_error_bodies_or_cli_output(ctx: Ctx) -> None:
    """Runs last in this module: everything the matrix, the users, the certificate login and the
    CLI tests produced is searched, plus a few errors made to tempt a leak."""
    admin = (ADMIN_EMAIL, str(ctx.cluster.admin_password))
    leaf, other = _leaf(), _leaf()
    for body in (
        {"name": "proxy", "certificate": leaf.full_chain_pem, "key": other.key_pem},  # mismatch
        {"name": "proxy", "certificate": leaf.key_pem, "key": leaf.key_pem},  # key as cert
        {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem_as("encrypted")},
        {"name": "mtls_trusted_ca", "certificate": leaf.full_chain_pem, "key": leaf.key_pem},
        {"name": "proxy", "certificate": leaf.full_chain_pem, "key": leaf.key_pem[:200]},
        {"name": "nope", "certificate": leaf.full_chain_pem, "key": leaf.key_pem},
    ):
        answer = ctx.request(admin, "PUT", "/v1/cluster/update_cert", body)
        assert answer.status_code >= 400, answer.text
    ctx.request(admin, "PUT", "/v1/cluster/update_cert", {"key": leaf.key_pem, "junk": 1})

    with ctx.admin() as client:
        stored = client.get("/v1/cluster/certificates").json()
        total = client.get("/v1/cluster/certificates/events").json()["total"]
        events = [
            client.get(f"/v1/cluster/certificates/events?limit=500&offset={o}").text
            for o in range(0, total, 500)
        ]
    directory = ctx.cluster.directory
    keys = [v for k, v in stored.items() if k.endswith("_key")] + UPLOADED_KEYS
    keys += [p.read_text() for p in directory.rglob("key.pem")]
    keys += [(directory / "ca.key").read_text()]
    # A PKCS#8 EC key ends with its public key, which the certificate holds too (the store keeps
    # the control plane's identity certificate): a fragment found in a certificate is public.
    public = "".join(
        p.read_text().replace("\n", "") for p in [*directory.rglob("*.pem")] if "key" not in p.name
    )
    fragments = {f for key in keys for f in _key_fragments(key) if f not in public}
    assert len(fragments) > 20

    logs = {str(p): p.read_text(errors="replace") for p in (directory / "logs").glob("*.log")}
    assert "server.log" in " ".join(logs)
    haystacks = {
        **logs,
        **{f"events page {i}": text for i, text in enumerate(events)},
        **{f"API answer or CLI output {i}": text for i, text in enumerate(SEEN)},
    }
    # Admin's GET /v1/cluster/certificates returns keys by design; nothing else may.
    haystacks = {name: text for name, text in haystacks.items() if '"api_key"' not in text}
    assert len(haystacks) > 5
    leaks = [
        name
        for name, text in haystacks.items()
        if any(f in text for f in fragments) or re.search(r"BEGIN [A-Z ]*PRIVATE KEY", text)
    ]
    assert leaks == []
    store_bytes = b"".join(p.read_bytes() for p in directory.glob("store.db*"))
    assert b"PRIVATE KEY" not in store_bytes
    assert not [f for f in fragments if f.encode() in store_bytes]
