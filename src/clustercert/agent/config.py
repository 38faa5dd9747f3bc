"""The node agent's configuration file (TOML), parsed once into frozen values.

Every error names the key that is wrong (``ConfigError``, CLI exit 2).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clustercert.errors import ConfigError
from clustercert.etcdmember import MemberSpec
from clustercert.hosts import is_wildcard
from clustercert.names import NAMES

__all__ = [
    "REDIS_CLIENT_CERTIFICATES",
    "AgentConfig",
    "ServiceConfig",
    "load_agent_config",
    "split_address",
]

# The names a redis-server may present as the client of its replication link (DESIGN §3).
REDIS_CLIENT_CERTIFICATES = ("data_internode_encryption", "syncer")


def split_address(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServiceConfig:
    """One TLS service on the node that the agent reloads and verifies."""

    name: str
    # "redis" | "command" | "metrics" (the agent's own Prometheus listener) | "etcd" (a member
    # of the cluster configuration store, serving ccs_internode_encryption)
    type: str
    certificate: str  # the certificate name it serves
    address: tuple[str, int] | None  # where a handshake proves what it serves
    socket: Path | None = None  # redis: local unix socket for CONFIG SET
    # redis: the outgoing client certificate of its replication link (tls-client-cert-file):
    # data_internode_encryption inside the cluster, syncer from a source outside it.
    client_certificate: str | None = None
    replicaof: tuple[str, int] | None = None  # redis: the primary it replicates from
    cluster_port: int | None = None  # redis: a Redis Cluster node; its cluster bus port (TLS)
    extra_ca_file: Path | None = None  # redis: more CAs for its trust bundle (operator's)
    # redis: how long a replication link may take to come back after a commit; keep it below
    # the control plane's --agent-timeout (10 s), which bounds the whole commit call.
    link_timeout: float = 5.0
    # redis: the agent starts redis-server itself; etcd (default on): the agent starts the
    # member when it does not run, and restarts it to load a new trusted CA bundle
    supervise: bool = False
    server_binary: str = "redis-server"
    # command: argv; {cert} and {key} are replaced by paths. etcd: the command that restarts
    # the member when another process manager runs it (e.g. systemctl restart etcd-member)
    command: tuple[str, ...] = ()
    sni: str = "localhost"
    etcd: MemberSpec | None = None  # etcd: the member (its directory, URLs, cluster)

    @property
    def role(self) -> str:
        """redis: ``replica`` when it replicates from a primary, otherwise ``primary``."""
        return "replica" if self.replicaof else "primary"


@dataclass(frozen=True)
class AgentConfig:
    name: str
    data_dir: Path
    listen: tuple[str, int]
    advertise_url: str
    control_plane_url: str
    ca_file: Path | None
    join_token: str | None
    services: tuple[ServiceConfig, ...]
    probe_timeout: float = 5.0


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}{key}: missing")
    value = table[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}{key}: expected {kind.__name__}, got {value!r}")
    return value


def _service(raw: dict[str, Any], index: int) -> ServiceConfig:
    where = f"services[{index}]."
    kind = _require(raw, "type", str, where)
    if kind not in {"redis", "command", "metrics", "etcd"}:
        raise ConfigError(f"{where}type: expected redis, command, metrics or etcd, got {kind!r}")
    default_cert = {
        "redis": "proxy",
        "metrics": "metrics_exporter",
        "etcd": "ccs_internode_encryption",
    }.get(kind)
    certificate = str(raw.get("certificate", default_cert))
    if certificate not in NAMES:
        raise ConfigError(f"{where}certificate: unknown certificate name {certificate!r}")
    address = raw.get("address")
    client_cert = raw.get("client_certificate")
    if kind == "redis":
        client_cert = client_cert or "data_internode_encryption"
        if client_cert not in REDIS_CLIENT_CERTIFICATES:
            raise ConfigError(
                f"{where}client_certificate: expected data_internode_encryption (replication "
                f"inside the cluster) or syncer (from a source outside it), got {client_cert!r}"
            )
    elif client_cert is not None:
        raise ConfigError(f"{where}client_certificate: only a redis service has one")
    replicaof = raw.get("replicaof")
    if replicaof is not None and (kind != "redis" or not isinstance(replicaof, str)):
        raise ConfigError(f"{where}replicaof: a redis service's primary, HOST:PORT")
    cluster_port = raw.get("cluster_port")
    if cluster_port is not None and (
        kind != "redis" or not isinstance(cluster_port, int) or not 0 < cluster_port < 65536
    ):
        raise ConfigError(f"{where}cluster_port: a redis service's cluster bus port, 1-65535")
    if cluster_port is not None and replicaof is not None:
        raise ConfigError(
            f"{where}replicaof: a Redis Cluster node (cluster_port) gets its primary from the "
            "cluster, not from replicaof"
        )
    extra_ca = raw.get("extra_ca_file")
    if extra_ca is not None and not Path(str(extra_ca)).is_file():
        raise ConfigError(f"{where}extra_ca_file: {extra_ca} is not a file")
    socket = raw.get("socket")
    if kind == "redis" and not socket:
        raise ConfigError(f"{where}socket: required for a redis service (its unix socket)")
    command = raw.get("command", [])
    if kind == "command" and (not command or not all(isinstance(a, str) for a in command)):
        raise ConfigError(f"{where}command: required, a list of strings")
    if kind == "etcd" and not (
        isinstance(command, list) and all(isinstance(a, str) for a in command)
    ):
        raise ConfigError(f"{where}command: a list of strings (how to restart the member)")
    if kind in {"redis", "metrics"} and not address:
        raise ConfigError(f"{where}address: required (HOST:PORT of the TLS listener)")
    etcd = _etcd_member(raw, where) if kind == "etcd" else None
    if etcd is not None:
        if certificate != "ccs_internode_encryption":
            raise ConfigError(f"{where}certificate: an etcd member serves ccs_internode_encryption")
        address = address or "{}:{}".format(*etcd.client_address)
    return ServiceConfig(
        name=str(raw.get("name", f"{kind}-{index}")),
        type=kind,
        certificate=certificate,
        address=split_address(address, where + "address") if address else None,
        socket=Path(socket) if socket else None,
        client_certificate=client_cert,
        replicaof=split_address(replicaof, where + "replicaof") if replicaof else None,
        cluster_port=cluster_port,
        extra_ca_file=Path(str(extra_ca)) if extra_ca else None,
        link_timeout=float(raw.get("link_timeout", 5.0)),
        supervise=bool(raw.get("supervise", kind == "etcd")),
        server_binary=str(raw.get("server_binary", "etcd" if etcd else "redis-server")),
        command=tuple(command),
        sni=str(raw.get("sni", "localhost")),
        etcd=etcd,
    )


def _etcd_member(raw: dict[str, Any], where: str) -> MemberSpec:
    """An etcd service's member: ``member_name``, ``member_dir``, ``client_url``, ``peer_url``
    (https://HOST:PORT) and ``initial_cluster`` (etcd's ``name=peer_url,...``)."""
    values = {
        key: _require(raw, key, str, where)
        for key in ("member_name", "member_dir", "client_url", "peer_url", "initial_cluster")
    }
    spec = MemberSpec(
        name=values["member_name"],
        directory=Path(values["member_dir"]),
        client_url=values["client_url"].rstrip("/"),
        peer_url=values["peer_url"].rstrip("/"),
        initial_cluster=values["initial_cluster"],
        binary=str(raw.get("server_binary", "etcd")),
    )
    for key in ("client_url", "peer_url"):
        try:
            getattr(spec, key.replace("url", "address"))
        except ValueError as exc:
            raise ConfigError(f"{where}{key}: {exc}") from None
    if f"{spec.name}={spec.peer_url}" not in spec.initial_cluster.split(","):
        raise ConfigError(
            f"{where}initial_cluster: must list this member as {spec.name}={spec.peer_url}"
        )
    return spec


def _advertise_url(raw: dict[str, Any], listen: tuple[str, int]) -> str:
    """Where the control plane reaches this agent: ``advertise_url``, or the listen address
    when that is one address (a wildcard such as 0.0.0.0 is reachable nowhere by that name)."""
    value = raw.get("advertise_url")
    if value is None:
        if is_wildcard(listen[0]):
            shown = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
            raise ConfigError(
                f'advertise_url: required because listen = "{shown}:{listen[1]}" accepts '
                "connections on every address and names none the control plane can reach; "
                f'add advertise_url = "https://THIS_NODE_ADDRESS:{listen[1]}"'
            )
        host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
        return f"https://{host}:{listen[1]}"
    if not isinstance(value, str):
        raise ConfigError(f"advertise_url: expected a string, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"advertise_url: expected https://HOST:PORT, got {value!r}")
    if is_wildcard(parts.hostname):
        raise ConfigError(
            f"advertise_url: {value!r} names no host the control plane can reach; give this "
            "node's address or DNS name"
        )
    return value.rstrip("/")


def load_agent_config(path: Path) -> AgentConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"agent configuration {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"agent configuration {path} is not valid TOML: {exc}") from exc
    listen = split_address(_require(raw, "listen", str, ""), "listen")
    advertise = _advertise_url(raw, listen)
    services = raw.get("services", [])
    if not isinstance(services, list):
        raise ConfigError("services: expected an array of tables ([[services]])")
    return AgentConfig(
        name=_require(raw, "name", str, ""),
        data_dir=Path(_require(raw, "data_dir", str, "")),
        listen=listen,
        advertise_url=str(advertise),
        control_plane_url=_require(raw, "control_plane_url", str, ""),
        ca_file=Path(raw["ca_file"]) if raw.get("ca_file") else None,
        join_token=raw.get("join_token"),
        services=tuple(_service(s, i) for i, s in enumerate(services)),
        probe_timeout=float(raw.get("probe_timeout", 5.0)),
    )
