"""The state store (DESIGN §9): the :class:`Store` interface, its backends and a factory.

``open_store`` turns the operator's ``--store`` value into a backend:

- a plain path (``/var/lib/clustercert/state.db``) or ``sqlite:///abs/path.db``: SQLite;
- ``etcd://host:port[,host:port...][/prefix]``: etcd v3 over its JSON gateway (plain HTTP),
  keys under ``/prefix/`` (default ``/clustercert/``); several members, comma-separated, are
  tried in turn (:class:`EtcdStore`);
- ``etcd+https://host:port[,host:port...][/prefix]``: the same over HTTPS with a client
  certificate (``tls``: the control plane's, see control/directory.py).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from clustercert.errors import ConfigError
from clustercert.store.base import Delete, Entry, Put, Store
from clustercert.store.etcd import EtcdStore, EtcdTLS
from clustercert.store.sqlite import SqliteStore

__all__ = [
    "Delete",
    "Entry",
    "EtcdStore",
    "EtcdTLS",
    "Put",
    "SqliteStore",
    "Store",
    "is_etcd_tls",
    "open_store",
]

DEFAULT_ETCD_PORT = 2379
DEFAULT_ETCD_PREFIX = "/clustercert/"

_SCHEMES = ("sqlite", "etcd", "etcd+https")
_FORMS = (
    "a file path, sqlite:///ABSOLUTE/PATH.db, etcd://HOST:PORT[,HOST:PORT...][/PREFIX] or "
    "etcd+https://HOST:PORT[,HOST:PORT...][/PREFIX]"
)


def is_etcd_tls(url: str) -> bool:
    """Whether ``url`` names an etcd reached over HTTPS (it needs :class:`EtcdTLS`)."""
    return url.lower().startswith("etcd+https://")


def open_store(url_or_path: str | os.PathLike[str], tls: EtcdTLS | None = None) -> Store:
    """Open the store named by ``url_or_path`` (see the module docstring).

    Raises :class:`~clustercert.errors.ConfigError` for a value of none of those forms and
    :class:`~clustercert.errors.StoreError` if a SQLite file cannot be opened. An etcd store
    does not contact the server until its first call.
    """
    if isinstance(url_or_path, os.PathLike):
        return SqliteStore(url_or_path)
    if not url_or_path:
        raise ConfigError(f"empty store location; expected {_FORMS}")
    parts = urlsplit(url_or_path)
    scheme = parts.scheme.lower()
    if "://" not in url_or_path and scheme not in _SCHEMES:
        return SqliteStore(url_or_path)
    if scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ConfigError(
                f"store {url_or_path!r}: a SQLite URL needs an absolute path after three "
                f"slashes, e.g. sqlite:///var/lib/clustercert/state.db"
            )
        return SqliteStore(parts.path)
    if scheme in ("etcd", "etcd+https"):
        if scheme == "etcd+https" and tls is None:
            raise ConfigError(
                f"store {url_or_path!r}: HTTPS to etcd needs a CA and a client certificate"
            )
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ConfigError(f"store {url_or_path!r}: expected {_FORMS}")
        tls = tls if scheme == "etcd+https" else None
        web = "https" if tls else "http"
        return EtcdStore(  # EtcdStore normalises the prefix's slashes
            endpoint=[_etcd_member(url_or_path, m, web) for m in parts.netloc.split(",")],
            prefix=parts.path.strip("/") or DEFAULT_ETCD_PREFIX,
            tls=tls,
        )
    raise ConfigError(f"store {url_or_path!r}: unknown scheme {parts.scheme!r}; expected {_FORMS}")


def _etcd_member(url: str, netloc: str, web: str) -> str:
    """One member's client URL from ``HOST[:PORT]`` of an etcd store URL."""
    try:
        member = urlsplit(f"//{netloc}")
        host, port = member.hostname, member.port
    except ValueError as exc:
        raise ConfigError(f"store {url!r}: {exc}; expected {_FORMS}") from exc
    if not host:
        raise ConfigError(f"store {url!r}: expected {_FORMS}")
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    return f"{web}://{host}:{port or DEFAULT_ETCD_PORT}"
