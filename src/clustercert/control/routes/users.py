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
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from clustercert.clock import utc_now
from clustercert.control.answers import UserBody, answers, request_body
from clustercert.control.audit import UserEvent
from clustercert.control.auth import canonical_subject, hash_password
from clustercert.control.http import Manager, Plane, StrictModel, parse_model, read_json
from clustercert.control.plane import ControlPlane
from clustercert.control.state import User
from clustercert.errors import (
    InsufficientPermissions,
    InvalidSchema,
    NotFound,
    UndeletableUser,
    UserExists,
)
from clustercert.roles import Role

__all__ = ["NewUser", "router"]

log = logging.getLogger("clustercert.users")

router = APIRouter()


# One "@", nothing that breaks HTTP Basic (":") or log lines (controls), no spaces. Explicit
# code points only: this pattern is also the OpenAPI document's, and JSON Schema's "\s" is not
# Python's (a difference the fuzzer finds).
EMAIL_PATTERN = r"^[^@:\x00-\x20\x7f]+@[^@:\x00-\x20\x7f]+$"


class NewUser(StrictModel):
    email: str = Field(min_length=3, max_length=254, pattern=EMAIL_PATTERN)
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    role: Role
    name: str = Field(default="", max_length=256)
    auth_method: Literal["regular", "certificate"] = "regular"
    certificate_subject_line: str | None = Field(default=None, min_length=3, max_length=1024)


@router.post(
    "/v1/users",
    openapi_extra=request_body(NewUser),
    responses=answers(UserBody, 400, 401, 403, 408, 409, 413, 415),
    response_model_exclude_none=True,
)
async def create_user(request: Request, cp: Plane, actor: Manager) -> UserBody:
    body = parse_model(NewUser, await read_json(request))
    _may_touch(actor, body.role, "create")
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
        if await cp.state.certificate_user(subject) is not None:
            raise UserExists(f"a user already logs in with the subject {subject!r}")
        password_hash = ""
    else:
        if body.certificate_subject_line is not None:
            raise InvalidSchema('certificate_subject_line: only for auth_method "certificate"')
        if body.password is None:
            raise InvalidSchema("password: required (at least 8 characters)")
        password_hash = await asyncio.to_thread(hash_password, body.password)
    user = await cp.state.create_user(
        body.email,
        body.name,
        body.role,
        password_hash,
        auth_method=body.auth_method,
        certificate_subject_line=subject,
    )
    await _audit(cp, actor, "user_create", user)
    return UserBody.of(user)


@router.get(
    "/v1/users", responses=answers(list[UserBody], 401, 403), response_model_exclude_none=True
)
async def list_users(cp: Plane, actor: Manager) -> list[UserBody]:
    return [UserBody.of(u) for u in sorted(await cp.state.users(), key=lambda u: u.uid)]


@router.get(
    "/v1/users/{uid}",
    responses=answers(UserBody, 400, 401, 403, 404),
    response_model_exclude_none=True,
)
async def get_user(uid: int, cp: Plane, actor: Manager) -> UserBody:
    user = await cp.state.user_by_uid(uid)
    if user is None:
        raise NotFound(f"no user with uid {uid}")
    return UserBody.of(user)


@router.delete(
    "/v1/users/{uid}",
    responses=answers(UserBody, 400, 401, 403, 404, 409),
    response_model_exclude_none=True,
)
async def delete_user(uid: int, cp: Plane, actor: Manager) -> UserBody:
    user = await cp.state.user_by_uid(uid)
    if user is None:
        raise NotFound(f"no user with uid {uid}")
    _may_touch(actor, user.role, "delete")
    if user.uid == actor.uid:
        raise UndeletableUser(f"{actor.email} cannot delete the user it is logged in as")
    deleted = await cp.state.delete_user(uid)
    if deleted is None:
        raise NotFound(f"no user with uid {uid}")
    await _audit(cp, actor, "user_delete", deleted)
    return UserBody.of(deleted)


def _may_touch(actor: User, role: str, what: str) -> None:
    if role == "admin" and actor.role != "admin":
        raise InsufficientPermissions(
            f"only an admin may {what} an admin user ({actor.email} is {actor.role})"
        )


async def _audit(cp: ControlPlane, actor: User, action: str, user: User) -> None:
    await cp.state.add_event(
        UserEvent(utc_now(), actor.email, action, uid=user.uid, email=user.email,
                  role=user.role, auth_method=user.auth_method)
    )  # fmt: skip
    log.info("%s: %s %s (uid %d, role %s)", actor.email, action, user.email, user.uid, user.role)
