"""Roles and the permissions they grant (DESIGN §8, Redis Enterprise's role names).

The one list of roles: the API's schema, the CLI's choices and the authoriser all read it here.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MANAGE_USERS", "ROLES", "ROLE_NAMES", "UPDATE", "VIEW", "Role", "permissions_of"]

VIEW = "view_cluster_info"
UPDATE = "update_cluster"
MANAGE_USERS = "manage_users"

Role = Literal[
    "admin", "cluster_member", "cluster_viewer", "db_member", "db_viewer", "user_manager"
]
ROLE_NAMES: tuple[str, ...] = get_args(Role)

ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({VIEW, UPDATE, MANAGE_USERS}),
    "cluster_member": frozenset({VIEW}),
    "cluster_viewer": frozenset({VIEW}),
    "db_member": frozenset({VIEW}),
    "db_viewer": frozenset({VIEW}),
    "user_manager": frozenset({VIEW, MANAGE_USERS}),
}
assert set(ROLES) == set(ROLE_NAMES), "every role has its permissions"


def permissions_of(role: str) -> frozenset[str]:
    """What ``role`` may do; an unknown role may do nothing."""
    return ROLES.get(role, frozenset())
