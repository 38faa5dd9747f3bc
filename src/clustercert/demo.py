"""A local multi-node cluster on loopback: ``clustercert demo`` and the tests' cluster fixture.

It initialises a cluster directory (if needed), starts the control plane and N agents (each
supervising a real ``redis-server`` with TLS on its own port) as separate processes, waits until
every node serves the desired certificates, and writes ``DIR/cluster.json``.

With ``ha``, the store is a 3-member etcd on loopback over TLS (``ccs_internode_encryption``):
member i runs on node i and that node's agent manages its certificate files; two control planes
share it (the first at the API port). Bootstrap order: ``init`` writes the CA and the first ccs
pair, the demo gives each member its files and starts it, ``init`` then seeds the store, the
control planes start, and the agents, joining, take the members over.

The redis-servers form one replicated database: node-1's is the primary, every other one
replicates from it over TLS, and every TLS client (replicas included) must present a
certificate (``tls-auth-clients yes``). With ``redis="cluster"`` they form a Redis Cluster
instead (every node a primary with its share of the slots, ``tls-cluster yes``). The
operator's own client certificate, issued by the internal CA, is in ``DIR/redis-client/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clustercert import etcdmember, pki
from clustercert.agent.config import load_agent_config
from clustercert.certfiles import write_atomically
from clustercert.clock import utc_now
from clustercert.control.directory import ClusterDirectory, init_cluster
from clustercert.control.state import DEFAULT_INTERNAL_VALIDITY
from clustercert.errors import ConfigError
from clustercert.etcdmember import MemberSpec

__all__ = ["CONSOLE_PORT", "DemoCluster", "DemoNode", "free_port", "port_or_free"]

ADMIN_EMAIL = "admin@cluster.local"
CONSOLE_PORT = 8443  # the console's default port; the demo takes a free one when it is in use


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (and ``bind(0)``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_handed_out: set[int] = set()  # free_port never answers the same port twice in a process

# Several processes picking ports at once (test runs on several workers) each take their own
# slice of the range, so that none picks a port another chose but has not bound yet.
PORT_SLICE_ENV = "CLUSTERCERT_PORT_SLICE"


def _port_candidates() -> range:
    """Below the ephemeral range (20,000 ports), or this process's slice of it: the
    environment's ``CLUSTERCERT_PORT_SLICE=I/N`` (``I`` from 0) takes the ``I``-th of ``N``."""
    top = min(_ephemeral_ports().start, 65536)
    candidates = range(max(1024, top - 20000), top)
    index, _, count = os.environ.get(PORT_SLICE_ENV, "0/1").partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ConfigError(
            f"{PORT_SLICE_ENV} must read I/N (e.g. 0/2), not {index}/{count}"
        ) from None
    if not 0 <= i < n:
        raise ConfigError(f"{PORT_SLICE_ENV}={i}/{n}: I must be at least 0 and less than N")
    size = len(candidates) // n
    return range(candidates.start + i * size, candidates.start + (i + 1) * size)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, chosen at random *below* the ephemeral range.

    The process that will listen on it binds it seconds later (an agent binds after it has
    joined). A port from ``bind(0)`` is an ephemeral one, which any outgoing connection on the
    machine may take meanwhile (the control plane's calls, replication links, other test runs):
    the listener then fails with EADDRINUSE (an agent exits with uvicorn's code 3). Below the
    range, only a process that asks for that very port can take it."""
    candidates = _port_candidates()
    for _ in range(200):
        port = secrets.choice(candidates)
        if port in _handed_out:
            continue  # chosen before, perhaps not bound yet: a cluster of 30 picks 90 ports
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))  # the whole low range is taken: fall back to the kernel's choice
        return int(sock.getsockname()[1])


def port_or_free(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` when nothing listens on it (as uvicorn binds: SO_REUSEADDR), else a free
    port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, preferred))
        except OSError:
            return free_port(host)
    return preferred


def _python_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clustercert", *args]


@dataclass
class DemoNode:
    name: str
    directory: Path
    agent_port: int
    redis_port: int
    metrics_port: int | None = None  # the agent's own HTTPS listener (metrics_exporter)
    replicaof: int | None = None  # the primary's redis TLS port; None: this is the primary
    cluster_port: int | None = None  # Redis Cluster mode: the node's cluster bus port
    etcd: MemberSpec | None = None  # ha: the etcd member this node's agent manages
    process: subprocess.Popen[bytes] | None = None

    @property
    def role(self) -> str:
        return "primary" if self.replicaof is None else "replica"

    @property
    def config_file(self) -> Path:
        return self.directory / "agent.toml"

    @property
    def agent_url(self) -> str:
        return f"https://127.0.0.1:{self.agent_port}"

    @property
    def redis_pid(self) -> int | None:
        try:
            return int((self.directory / "redis.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_config(self, api_url: str, ca_file: Path, token: str | None) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = [
            f'name = "{self.name}"',
            f'data_dir = "{self.directory}"',
            f'listen = "127.0.0.1:{self.agent_port}"',
            f'control_plane_url = "{api_url}"',
            f'ca_file = "{ca_file}"',
        ]
        if token:
            lines.append(f'join_token = "{token}"')
        lines += [
            "",
            "[[services]]",
            'name = "redis"',
            'type = "redis"',
            'certificate = "proxy"',
            'client_certificate = "data_internode_encryption"',
            f'socket = "{self.directory / "redis.sock"}"',
            f'address = "127.0.0.1:{self.redis_port}"',
            "supervise = true",
        ]
        if self.replicaof is not None:
            lines.append(f'replicaof = "127.0.0.1:{self.replicaof}"')
        if self.cluster_port is not None:
            lines.append(f"cluster_port = {self.cluster_port}")
        if self.metrics_port is not None:
            lines += [
                "",
                "[[services]]",
                'name = "metrics"',
                'type = "metrics"',
                f'address = "127.0.0.1:{self.metrics_port}"',
            ]
        if self.etcd is not None:
            lines += [
                "",
                "[[services]]",
                'name = "etcd"',
                'type = "etcd"',
                f'member_name = "{self.etcd.name}"',
                f'member_dir = "{self.etcd.directory}"',
                f'client_url = "{self.etcd.client_url}"',
                f'peer_url = "{self.etcd.peer_url}"',
                f'initial_cluster = "{self.etcd.initial_cluster}"',
                f'server_binary = "{self.etcd.binary}"',
            ]
        self.config_file.write_text("\n".join(lines) + "\n")


@dataclass
class DemoCluster:
    directory: Path
    nodes_count: int = 3
    redis: str = "replicated"  # or "cluster": Redis Cluster over TLS (at least 3 nodes)
    api_port: int = 9443
    console_port: int | None = None  # None: CONSOLE_PORT, or a free port when that is taken
    admin_password: str | None = None
    server_args: tuple[str, ...] = ()
    store_url: str | None = None  # default: SQLite in the directory
    internal_validity: dt.timedelta = DEFAULT_INTERNAL_VALIDITY  # of autogenerated certificates
    log_dir: Path | None = None
    ha: bool = False  # a 3-member etcd over TLS shared by two control planes
    server: subprocess.Popen[bytes] | None = None
    nodes: list[DemoNode] = field(default_factory=list)
    members: list[MemberSpec] = field(default_factory=list)  # ha: the etcd members
    # ha: the control planes besides the first (self.server): (api port, process)
    more_servers: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def console_url(self) -> str:
        return f"https://127.0.0.1:{self.console_port}"

    @property
    def cluster(self) -> ClusterDirectory:
        return ClusterDirectory(self.directory)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start a process whose output goes to ``logs/<name>.log``."""
        log_dir = self.log_dir or self.directory / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def client(self, timeout: float = 60.0, url: str | None = None) -> httpx.Client:
        assert self.admin_password is not None
        return httpx.Client(
            base_url=url or self.api_url,
            auth=(ADMIN_EMAIL, self.admin_password),
            verify=ssl.create_default_context(cafile=str(self.cluster.ca_file)),
            timeout=timeout,
        )

    def start(self, wait: float = 60.0) -> None:
        self.directory = self.directory.resolve()
        secrets_file = self.directory / "demo-credentials.json"
        if self.ha:
            if self.nodes_count != 3:
                raise ConfigError("--ha runs one etcd member on each of 3 nodes (--nodes 3)")
            self.members = self._etcd_members()
            self.store_url = self.store_url_from(0)
        if not self.cluster.settings_file.exists():
            result = init_cluster(
                self.directory,
                name="cluster.local",
                admin_email=ADMIN_EMAIL,
                admin_password=self.admin_password,
                now=utc_now(),
                store_url=self.store_url,
                internal_validity=self.internal_validity,
                prepare_store=(lambda _: self.start_members(wait)) if self.ha else None,
            )
            self.admin_password = result.admin_password
            fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"username": ADMIN_EMAIL, "password": result.admin_password}, out)
        else:
            if self.admin_password is None:
                self.admin_password = json.loads(secrets_file.read_text())["password"]
            if self.ha:
                self.start_members(wait)
        self.issue_redis_client()
        if self.console_port is None:
            self.console_port = port_or_free(CONSOLE_PORT)
        self.start_server()
        self.wait_for_api(wait)
        self.wait_for_console(wait)
        if self.ha:
            self.start_more_servers(wait)
        for index in range(1, self.nodes_count + 1):
            self.add_node(f"node-{index}")
        self.wait_in_sync(wait)
        if self.redis == "cluster":
            self.form_redis_cluster(wait)

    # --- ha: the etcd members and the second control plane -------------------------------

    def store_url_from(self, first: int) -> str:
        """The store URL naming every member, ``members[first]`` asked first (each control
        plane prefers its own, and moves to the next when it is down)."""
        order = self.members[first:] + self.members[:first]
        hosts = ",".join(f"{m.client_address[0]}:{m.client_address[1]}" for m in order)
        return f"etcd+https://{hosts}/clustercert"

    def _etcd_members(self) -> list[MemberSpec]:
        """One member per node, in ``nodes/node-i/etcd``; the ports are kept in
        ``DIR/etcd-members.json`` (a member's data directory remembers its peers' URLs)."""
        record = self.directory / "etcd-members.json"
        if record.exists():
            ports = [tuple(p) for p in json.loads(record.read_text())]
        else:
            ports = [(free_port(), free_port()) for _ in range(3)]
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(record, json.dumps(ports).encode(), 0o644)
        names = [f"node-{i}" for i in range(1, 4)]
        cluster = ",".join(
            f"{n}=https://127.0.0.1:{p[1]}" for n, p in zip(names, ports, strict=True)
        )
        return [
            MemberSpec(
                name=name,
                directory=self.directory / "nodes" / name / "etcd",
                client_url=f"https://127.0.0.1:{client}",
                peer_url=f"https://127.0.0.1:{peer}",
                initial_cluster=cluster,
            )
            for name, (client, peer) in zip(names, ports, strict=True)
        ]

    def start_members(self, wait: float) -> None:
        """Start every member that does not run (a new one with the first ccs pair from
        ``DIR/ccs/``) and wait until each says it is healthy."""
        ccs = self.cluster.ccs_dir
        for member in self.members:
            if not member.cert_file.exists():
                etcdmember.write_bootstrap(
                    member,
                    (ccs / "cert.pem").read_text(),
                    (ccs / "key.pem").read_text(),
                    (ccs / "ca.pem").read_text(),
                )
            if etcdmember.running_pid(member) is None:
                etcdmember.start(member)
        tls = self.cluster.store_tls()
        context = etcdmember.client_context(tls.ca_file, tls.cert_file, tls.key_file)
        for member in self.members:
            reason = etcdmember.wait_healthy(member.client_url, context, wait)
            if reason is not None:
                raise ConfigError(
                    f"etcd member {member.name} is not healthy within {wait} s: {reason}; "
                    f"see {member.log_file}"
                )

    def start_more_servers(self, wait: float) -> None:
        """The second control plane: its own API and console ports, the same cluster
        directory, the store through the second member first."""
        api_port = free_port()
        process = self.spawn_second_server(api_port)
        self.more_servers.append((api_port, process))
        deadline = time.monotonic() + wait
        with self.client(timeout=2, url=f"https://127.0.0.1:{api_port}") as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ConfigError(
                        f"the second control plane exited with {process.returncode}; "
                        f"see {self.directory / 'logs' / 'server-2.log'}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/v1/nodes").status_code == 200:
                        return
                time.sleep(0.1)
        raise ConfigError(f"the second control plane did not answer within {wait} s")

    def spawn_second_server(self, api_port: int) -> subprocess.Popen[bytes]:
        """Start the second control plane (again, with the same API port after it stopped);
        does not wait for it."""
        return self._spawn(
            "server-2",
            _python_command(
                "server", "--dir", str(self.directory), "--listen", f"127.0.0.1:{api_port}",
                "--console-listen", f"127.0.0.1:{free_port()}",
                "--store", self.store_url_from(1), *self.server_args,
            ),
        )  # fmt: skip

    @property
    def redis_client(self) -> tuple[Path, Path]:
        """The operator's client certificate and key for redis (``tls-auth-clients yes``)."""
        directory = self.directory / "redis-client"
        return directory / "cert.pem", directory / "key.pem"

    def issue_redis_client(self) -> None:
        """Issue the operator's redis client certificate from the internal CA (clientAuth),
        once; it is not one of the managed names, so rotations leave it alone."""
        cert_file, key_file = self.redis_client
        if cert_file.exists():
            return
        cert_file.parent.mkdir(mode=0o700, exist_ok=True)
        pair = pki.issue_leaf(
            self.cluster.ca(), "redis-operator", sans=(), eku={"clientAuth"}, now=utc_now()
        )
        write_atomically(key_file, pair.key_pem.encode())
        write_atomically(cert_file, pair.cert_pem.encode(), 0o644)

    def start_server(self) -> None:
        self.server = self._spawn(
            "server",
            _python_command(
                "server", "--dir", str(self.directory), "--listen", f"127.0.0.1:{self.api_port}",
                "--console-listen", f"127.0.0.1:{self.console_port}", *self.server_args,
            ),
        )  # fmt: skip

    def add_node(self, name: str) -> DemoNode:
        node_dir = self.directory / "nodes" / name
        node = DemoNode(name, node_dir, *self._ports(node_dir))
        node.etcd = next((m for m in self.members if m.name == name), None)
        if self.redis == "cluster":
            node.cluster_port = self._cluster_port(node_dir)
        elif self.nodes:  # the first node's redis is the primary; the others replicate from it
            node.replicaof = self.nodes[0].redis_port
        token = None
        if not (node_dir / "identity" / "node.json").exists():
            token = self.cluster.new_join_token(utc_now(), dt.timedelta(minutes=10))
        node.write_config(self.api_url, self.cluster.ca_file, token)
        self.nodes.append(node)
        self.start_agent(node)
        return node

    @staticmethod
    def _ports(node_dir: Path) -> tuple[int, int, int]:
        """Agent, redis and metrics ports. A node that ran before keeps its ports: the control
        plane knows it by its URL."""
        config_file = node_dir / "agent.toml"
        if config_file.exists():
            config = load_agent_config(config_file)
            ports = {s.type: s.address[1] for s in config.services if s.address}
            if "redis" in ports and "metrics" in ports:
                return config.listen[1], ports["redis"], ports["metrics"]
        return free_port(), free_port(), free_port()

    @staticmethod
    def _cluster_port(node_dir: Path) -> int:
        """The cluster bus port; kept across restarts (the other nodes' nodes.conf has it)."""
        config_file = node_dir / "agent.toml"
        if config_file.exists():
            for service in load_agent_config(config_file).services:
                if service.cluster_port is not None:
                    return service.cluster_port
        return free_port()

    def form_redis_cluster(self, wait: float) -> None:
        """Join the nodes' redis-servers into one Redis Cluster (once: a restarted demo's
        nodes find each other again in their nodes.conf), then wait until every node says
        ``cluster_state:ok``."""
        if self.nodes_count < 3:
            raise ConfigError("a Redis Cluster needs at least 3 nodes (--nodes 3)")
        cert_file, key_file = self.redis_client
        tls = ["--tls", "--cert", str(cert_file), "--key", str(key_file),
               "--cacert", str(self.cluster.ca_file)]  # fmt: skip
        if "cluster_known_nodes:1" in _cluster_info(self.nodes[0]).split():
            subprocess.run(
                ["redis-cli", *tls, "--cluster", "create",
                 *(f"127.0.0.1:{n.redis_port}" for n in self.nodes), "--cluster-yes"],
                capture_output=True, timeout=60, check=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in _cluster_info(n) for n in self.nodes):
                return
            time.sleep(0.1)
        raise ConfigError(f"the Redis Cluster was not ok within {wait} s")

    def start_agent(self, node: DemoNode) -> None:
        node.process = self._spawn(
            node.name, _python_command("agent", "--config", str(node.config_file))
        )

    def wait_for_api(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        with self.client(timeout=2) as client:
            while time.monotonic() < deadline:
                self._check_server()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/v1/nodes").status_code == 200:
                        return
                time.sleep(0.1)
        raise ConfigError(f"the control plane did not answer at {self.api_url} within {wait} s")

    def wait_for_console(self, wait: float) -> None:
        """Until the console's login page answers over TLS with the `cm` certificate."""
        deadline = time.monotonic() + wait
        verify = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        with httpx.Client(base_url=self.console_url, verify=verify, timeout=2) as client:
            while time.monotonic() < deadline:
                self._check_server()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/login").status_code == 200:
                        return
                time.sleep(0.1)
        raise ConfigError(f"the console did not answer at {self.console_url} within {wait} s")

    def _check_server(self) -> None:
        if self.server is not None and self.server.poll() is not None:
            raise ConfigError(
                f"the control plane exited with {self.server.returncode}; "
                f"see {self.directory / 'logs' / 'server.log'}"
            )

    def wait_in_sync(self, wait: float) -> None:
        """Until every node has joined and proved every desired certificate."""
        deadline = time.monotonic() + wait
        nodes: list[dict[str, Any]] = []
        with self.client(timeout=5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    nodes = client.get("/v1/nodes").json()
                    if len(nodes) >= len(self.nodes) and all(n["in_sync"] for n in nodes):
                        return
                for node in self.nodes:
                    if node.process is not None and node.process.poll() is not None:
                        raise ConfigError(
                            f"agent {node.name} exited with {node.process.returncode}; "
                            f"see {self.directory / 'logs' / (node.name + '.log')}"
                        )
                time.sleep(0.1)
        raise ConfigError(f"the nodes were not in sync within {wait} s: {nodes}")

    def describe(self) -> dict[str, Any]:
        """The contents of ``cluster.json`` (DESIGN §10, §13 for ``control_planes`` and
        ``etcd`` with ha)."""
        info = self._describe()
        if self.ha:
            info["control_planes"] = [
                {"api_url": self.api_url, "pid": self.server.pid if self.server else None},
                *({"api_url": f"https://127.0.0.1:{port}", "pid": p.pid}
                  for port, p in self.more_servers),
            ]  # fmt: skip
            info["etcd"] = [
                {
                    "name": m.name,
                    "client_url": m.client_url,
                    "peer_url": m.peer_url,
                    "pid": etcdmember.running_pid(m),
                }
                for m in self.members
            ]
        return info

    def _describe(self) -> dict[str, Any]:
        return {
            "api_url": self.api_url,
            "console_url": self.console_url,
            "username": ADMIN_EMAIL,
            "password": self.admin_password,
            "ca_file": str(self.cluster.ca_file),
            "server_pid": self.server.pid if self.server else None,
            "nodes": [
                {
                    "name": n.name,
                    "agent_url": n.agent_url,
                    "agent_pid": n.process.pid if n.process else None,
                    "redis": {
                        "host": "127.0.0.1",
                        "tls_port": n.redis_port,
                        "pid": n.redis_pid,
                        "role": n.role,
                    },
                    "metrics_url": f"https://127.0.0.1:{n.metrics_port}/metrics"
                    if n.metrics_port
                    else None,
                }
                for n in self.nodes
            ],
            "redis_client": {
                "cert_file": str(self.redis_client[0]),
                "key_file": str(self.redis_client[1]),
                "ca_file": str(self.cluster.ca_file),
            },
        }

    def write_cluster_json(self) -> Path:
        path = self.directory / "cluster.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.describe(), out, indent=2)
        return path

    def stop(self) -> None:
        """Stop every process this cluster started: agents (which stop their redis), then the
        control planes, then the etcd members. Waits for each; kills what does not stop
        within 10 s."""
        processes = [n.process for n in self.nodes if n.process] + (
            [self.server] if self.server else []
        )
        processes += [process for _, process in self.more_servers]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for node in self.nodes:
            pid = node.redis_pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for member in self.members:
            etcdmember.stop(member)


def _cluster_info(node: DemoNode) -> str:
    """``CLUSTER INFO`` of the node's redis, over its unix socket."""
    return subprocess.run(
        ["redis-cli", "-s", str(node.directory / "redis.sock"), "CLUSTER", "INFO"],
        capture_output=True, text=True, timeout=10, check=True, stdin=subprocess.DEVNULL,
    ).stdout  # fmt: skip


def run_demo(
    directory: Path, nodes: int, port: int, redis: str = "replicated", ha: bool = False
) -> None:
    """``clustercert demo``: start, print what to try, run until SIGINT/SIGTERM, stop all."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    cluster = DemoCluster(directory, nodes_count=nodes, api_port=port, redis=redis, ha=ha)
    # cluster.json promises that everything answers: a stale one must not outlive its cluster.
    (directory / "cluster.json").unlink(missing_ok=True)
    try:
        print(f"starting a {nodes}-node cluster in {directory} ...", flush=True)
        cluster.start()
        path = cluster.write_cluster_json()
        print(_instructions(cluster, path), flush=True)
        while not stopping:
            time.sleep(0.2)
    finally:
        print("stopping every process of the demo ...", flush=True)
        cluster.stop()
        print("stopped.", flush=True)


def _ha_lines(info: dict[str, Any]) -> str:
    """With --ha: the control planes and the etcd members, and how to watch a failover."""
    if "etcd" not in info:
        return ""
    planes = "\n".join(f"    {p['api_url']} (pid {p['pid']})" for p in info["control_planes"])
    members = "\n".join(
        f"    {m['name']}: client {m['client_url']}, peer {m['peer_url']} (pid {m['pid']})"
        for m in info["etcd"]
    )
    return f"""
  control planes (either serves the API; they share the store):
{planes}
  etcd members (TLS with ccs_internode_encryption; each node's agent manages its member):
{members}
  failover: stop one member (kill PID) or one control plane and ask the other; rotate the
  store's certificate with `clustercert certificates rotate ccs_internode_encryption`.
"""


def _instructions(cluster: DemoCluster, path: Path) -> str:
    info = cluster.describe()
    redis_lines = "\n".join(
        f"    {n['name']}: redis TLS on 127.0.0.1:{n['redis']['tls_port']} ({n['redis']['role']})"
        for n in info["nodes"]
    )
    client = info["redis_client"]
    cluster_mode = cluster.redis == "cluster"
    redis_cli = (
        f"redis-cli {'-c ' if cluster_mode else ''}--tls --cert {client['cert_file']} "
        f"--key {client['key_file']} --cacert {client['ca_file']} "
        f"-p {info['nodes'][0]['redis']['tls_port']} "
        + ("CLUSTER INFO" if cluster_mode else "INFO replication")
    )
    return f"""
clustercert demo is running.
{_ha_lines(info)}
  API:       {info["api_url"]}
  console:   {info["console_url"]}  (log in with the user below; the `cm` certificate,
             issued by the CA file below)
  user:      {info["username"]}
  password:  {info["password"]}
  CA file:   {info["ca_file"]}
  details:   {path}
{redis_lines}

  redis (every client presents a certificate; this one is yours):
    {redis_cli}

Try:
  export CLUSTERCERT_URL={info["api_url"]} CLUSTERCERT_USER={info["username"]} \\
         CLUSTERCERT_PASSWORD='{info["password"]}' CLUSTERCERT_CA_FILE={info["ca_file"]}
  curl --cacert $CLUSTERCERT_CA_FILE -u "$CLUSTERCERT_USER:$CLUSTERCERT_PASSWORD" \\
       $CLUSTERCERT_URL/v1/nodes

  # replace the `proxy` certificate (redis TLS) on every node:
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \\
       -subj /CN=redis.example -addext subjectAltName=DNS:redis.example \\
       -addext basicConstraints=critical,CA:FALSE -keyout proxy.key -out proxy.pem
  CERT=$(sed -z 's/\\n/\\\\n/g' proxy.pem); KEY=$(sed -z 's/\\n/\\\\n/g' proxy.key)
  curl --cacert $CLUSTERCERT_CA_FILE -u "$CLUSTERCERT_USER:$CLUSTERCERT_PASSWORD" \\
       -X PUT -H 'Content-Type: application/json' $CLUSTERCERT_URL/v1/cluster/update_cert \\
       --data "{{\\"name\\": \\"proxy\\", \\"certificate\\": \\"$CERT\\", \\"key\\": \\"$KEY\\"}}"

  # what node-1's redis serves now:
  openssl s_client -connect 127.0.0.1:{info["nodes"][0]["redis"]["tls_port"]} </dev/null \\
       2>/dev/null | openssl x509 -noout -fingerprint -sha256

Press Ctrl-C to stop every process.
"""
