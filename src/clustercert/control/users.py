"""``/v1/users``: a Redis Enterprise-compatible subset of user management (DESIGN §8).

=========================  ==============================================  ==================
method and path            body                                            success
=========================  ==============================================  ==================
``POST /v1/users``         ``{"email", "password", "role", "name"}``, or   200, the user
                           ``"auth_method": "certificate"`` with a
                           ``certificate_subject_line`` and no password
``GET /v1/users``          —                                               200, every user
``GET /v1/users/{uid}``    —                                               200, the user
``DELETE /v1/users/{uid}`` —                                               200
=========================  ==============================================  ==================

Every route needs ``manage_users`` (roles ``admin`` and ``user_manager``). Only an admin may
create or delete an admin: otherwise a user manager could make itself one. Nobody may delete the
user they are logged in as, nor the last admin. Password hashes never leave the store; every
change is an audit event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from clustercert.clock import utc_now
from clustercert.control.apidoc import UserBody, answers, request_body
from clustercert.control.audit import UserEvent
from clustercert.control.auth import canonical_subject, hash_password
from clustercert.control.http import parse_model, read_json
from clustercert.control.state import User
from clustercert.errors import (
    InsufficientPermissions,
    InvalidSchema,
    NotFound,
    UndeletableUser,
    UserExists,
)
from clustercert.roles import MANAGE_USERS, Role

if TYPE_CHECKING:
    from clustercert.control.plane import ControlPlane

__all__ = ["NewUser", "users_router"]

log = logging.getLogger("clustercert.users")

# One "@", nothing that breaks HTTP Basic (":") or log lines (controls), no spaces. Explicit
# code points only: this pattern is also the OpenAPI document's, and JSON Schema's "\s" is not
# Python's (a difference the fuzzer finds).
EMAIL_PATTERN = r"^[^@:\x00-\x20\x7f]+@[^@:\x00-\x20\x7f]+$"


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    email: str = Field(min_length=3, max_length=254, pattern=EMAIL_PATTERN)
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    role: Role
    name: str = Field(default="", max_length=256)
    auth_method: Literal["regular", "certificate"] = "regular"
    certificate_subject_line: str | None = Field(default=None, min_length=3, max_length=1024)


def users_router(cp: ControlPlane) -> APIRouter:
    """The routes, for ``app.include_router``; bodies are read at the shared HTTP edge."""

    router = APIRouter()

    def caller(request: Request) -> User:
        user = cp.authenticator.authenticate_scope(request.scope)
        user.require(MANAGE_USERS)
        return user

    def may_touch(actor: User, role: str, what: str) -> None:
        if role == "admin" and actor.role != "admin":
            raise InsufficientPermissions(
                f"only an admin may {what} an admin user ({actor.email} is {actor.role})"
            )

    def audit(actor: User, action: str, user: User) -> None:
        cp.state.add_event(
            UserEvent(utc_now(), actor.email, action, uid=user.uid, email=user.email,
                      role=user.role, auth_method=user.auth_method)
        )  # fmt: skip
        log.info(
            "%s: %s %s (uid %d, role %s)", actor.email, action, user.email, user.uid, user.role
        )

    @router.post(
        "/v1/users",
        openapi_extra=request_body(NewUser),
        responses=answers(UserBody, 400, 401, 403, 408, 409, 413, 415),
    )
    async def create_user(request: Request) -> dict[str, Any]:
        actor = caller(request)
        body = parse_model(NewUser, await read_json(request))
        may_touch(actor, body.role, "create")
        subject = None
        if body.auth_method == "certificate":
            if body.password is not None:
                raise InvalidSchema("password: certificate users log in without a password")
            if body.certificate_subject_line is None:
                raise InvalidSchema(
                    "certificate_subject_line: required for auth_method certificate, e.g. "
                    '"CN=alice,OU=ops,O=Example,C=US" (RFC 2253)'
                )
            try:
                subject = canonical_subject(body.certificate_subject_line)
            except ValueError as exc:
                raise InvalidSchema(
                    f"certificate_subject_line: not an RFC 2253 distinguished name ({exc}), "
                    'e.g. "CN=alice,OU=ops,O=Example,C=US"'
                ) from None
            if cp.state.certificate_user(subject) is not None:
                raise UserExists(f"a user already logs in with the subject {subject!r}")
            password_hash = ""
        else:
            if body.certificate_subject_line is not None:
                raise InvalidSchema('certificate_subject_line: only for auth_method "certificate"')
            if body.password is None:
                raise InvalidSchema("password: required (at least 8 characters)")
            password_hash = await asyncio.to_thread(hash_password, body.password)
        user = cp.state.create_user(
            body.email,
            body.name,
            body.role,
            password_hash,
            auth_method=body.auth_method,
            certificate_subject_line=subject,
        )
        audit(actor, "user_create", user)
        return user.public()

    @router.get("/v1/users", responses=answers(list[UserBody], 401, 403))
    async def list_users(request: Request) -> list[dict[str, Any]]:
        caller(request)
        return [u.public() for u in sorted(cp.state.users(), key=lambda u: u.uid)]

    @router.get("/v1/users/{uid}", responses=answers(UserBody, 400, 401, 403, 404))
    async def get_user(request: Request, uid: int) -> dict[str, Any]:
        caller(request)
        user = cp.state.user_by_uid(uid)
        if user is None:
            raise NotFound(f"no user with uid {uid}")
        return user.public()

    @router.delete("/v1/users/{uid}", responses=answers(UserBody, 400, 401, 403, 404, 409))
    async def delete_user(request: Request, uid: int) -> dict[str, Any]:
        actor = caller(request)
        user = cp.state.user_by_uid(uid)
        if user is None:
            raise NotFound(f"no user with uid {uid}")
        may_touch(actor, user.role, "delete")
        if user.uid == actor.uid:
            raise UndeletableUser(f"{actor.email} cannot delete the user it is logged in as")
        deleted = cp.state.delete_user(uid)
        if deleted is None:
            raise NotFound(f"no user with uid {uid}")
        audit(actor, "user_delete", deleted)
        return deleted.public()

    return router
