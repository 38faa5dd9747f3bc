"""The ``clustercert`` command. ``main(argv)`` is testable in-process.

Errors from the one tree (:mod:`clustercert.errors`) become exit codes in one place: ``main``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from cryptography import x509

from clustercert import pki
from clustercert.certfiles import write_atomically
from clustercert.clock import parse_iso, utc_now
from clustercert.errors import CertificateRejected, ClusterCertError, UnknownCertificate
from clustercert.names import NAMES
from clustercert.roles import ROLE_NAMES

if TYPE_CHECKING:  # the commands import what they need: an agent loads no control plane
    from clustercert.client import ApiClient

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="clustercert")
def cli() -> None:
    """Replace TLS certificates on every node of a cluster, safely, with one call."""


@cli.group()
def certificates() -> None:
    """Inspect, validate and replace the cluster's certificates."""


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per request to every agent would drown what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@cli.command()
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--name", default="cluster.local", show_default=True, help="Cluster FQDN.")
@click.option("--admin-email", default="admin@cluster.local", show_default=True)
@click.option("--admin-password", default=None, help="Generated and printed once if omitted.")
@click.option("--store", default=None, help="Store URL (default: SQLite in DIR).")
def init(
    directory: Path, name: str, admin_email: str, admin_password: str | None, store: str | None
) -> None:
    """Create a cluster directory: internal CA, store, certificates, admin user."""
    from clustercert.control.directory import init_cluster

    result = init_cluster(
        directory,
        name=name,
        admin_email=admin_email,
        admin_password=admin_password,
        now=utc_now(),
        store_url=store,
    )
    click.echo(f"initialised cluster {name} in {directory}")
    click.echo(f"CA certificate: {result.directory.ca_file}")
    click.echo(f"admin user: {result.admin_email}")
    if result.password_generated:
        click.echo(f"admin password (shown once): {result.admin_password}")


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@cli.command()
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--listen", default="127.0.0.1:9443", show_default=True, help="HOST:PORT")
@click.option("--store", default=None, help="Store URL, overriding the cluster directory's.")
@click.option(
    "--agent-timeout", default=10.0, show_default=True, help="Seconds per call to an agent."
)
@click.option(
    "--lock-wait", default=30.0, show_default=True, help="Seconds an update waits for the lock."
)
@click.option("--reconcile-interval", default=1.0, show_default=True)
@click.option(
    "--console-listen", default="127.0.0.1:8443", show_default=True,
    help="HOST:PORT of the web console (served with the `cm` certificate).",
)  # fmt: skip
@click.option("--no-console", is_flag=True, help="Do not serve the web console.")
@click.option(
    "--watch-resync",
    default=120.0,
    show_default=True,
    help="Seconds before the status of a node known to be in sync is read again.",
)
def server(
    directory: Path,
    listen: str,
    store: str | None,
    agent_timeout: float,
    lock_wait: float,
    reconcile_interval: float,
    console_listen: str,
    no_console: bool,
    watch_resync: float,
) -> None:
    """Run the control plane (REST API and web console over HTTPS) until SIGINT/SIGTERM."""
    from clustercert import eventloop
    from clustercert.control.directory import ClusterDirectory
    from clustercert.control.server import ServerSettings, serve

    _setup_logging()
    host, port = _listen(listen)
    settings = ServerSettings(
        host=host,
        port=port,
        store=store,
        agent_timeout=agent_timeout,
        lock_wait=lock_wait,
        reconcile_interval=reconcile_interval,
        console=None if no_console else _listen(console_listen),
        watch_resync=watch_resync,
    )
    eventloop.run(serve(ClusterDirectory(directory), settings))


@cli.command("join-token")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--ttl", default=3600, show_default=True, help="Seconds the token stays valid.")
def join_token(directory: Path, ttl: int) -> None:
    """Print a one-time token with which one node joins."""
    from clustercert.control.directory import ClusterDirectory

    token = ClusterDirectory(directory).new_join_token(utc_now(), dt.timedelta(seconds=ttl))
    click.echo(token)


@cli.command("metrics-client-cert")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option(
    "--out-cert",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the client certificate (PEM, with the internal CA).",
)
@click.option("--out-key", required=True, type=click.Path(path_type=Path),
              help="Where to write its private key (PEM, mode 0600).")  # fmt: skip
def metrics_client_cert(directory: Path, out_cert: Path, out_key: Path) -> None:
    """Issue a client certificate for a metrics scraper (Prometheus) from the cluster's internal
    CA: the agents' metrics listeners accept it, their internode API refuses it."""
    from clustercert.control.directory import ClusterDirectory, issue_metrics_client

    pair = issue_metrics_client(ClusterDirectory(directory), utc_now())
    write_atomically(out_key, pair.key_pem.encode())
    write_atomically(out_cert, pair.cert_pem.encode(), 0o644)
    click.echo(f"wrote {out_cert} and {out_key} (valid 365 days)")


@cli.command()
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path))
def agent(config_file: Path) -> None:
    """Run the node agent (joins on first start) until SIGINT/SIGTERM."""
    from clustercert.agent.app import run_agent
    from clustercert.agent.config import load_agent_config

    _setup_logging()
    run_agent(load_agent_config(config_file))


@cli.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--dir", "directory", default=".clustercert-demo", show_default=True,
    type=click.Path(path_type=Path),
)  # fmt: skip
@click.option("--port", default=9443, show_default=True, help="API port.")
@click.option(
    "--redis", "redis_topology", default="replicated", show_default=True,
    type=click.Choice(["replicated", "cluster"]),
    help="replicated: node-1 primary, the others its replicas; cluster: Redis Cluster.",
)  # fmt: skip
def demo(nodes: int, directory: Path, port: int, redis_topology: str) -> None:
    """Start a local cluster (control plane, N agents, N redis-server) until Ctrl-C."""
    from clustercert.demo import run_demo

    run_demo(directory, nodes, port, redis_topology)


# --- client commands (over the REST API) ------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def client_options(command: F) -> F:
    """--url/--user/--password/--ca-file (or CLUSTERCERT_*), or --cluster-file; and --json."""
    options = [
        click.option("--url", envvar="CLUSTERCERT_URL", help="API URL, e.g. https://host:9443"),
        click.option("--user", envvar="CLUSTERCERT_USER", help="API user (email)."),
        click.option("--password", envvar="CLUSTERCERT_PASSWORD", help="API password."),
        click.option(
            "--ca-file", envvar="CLUSTERCERT_CA_FILE",
            help="CA bundle that issued the API's certificate (e.g. the cluster's ca.pem).",
        ),
        click.option(
            "--json", "as_json", is_flag=True,
            help="Print the API's JSON answer (on a 409: its error body) instead of tables.",
        ),
        click.option(
            "--cluster-file", envvar="CLUSTERCERT_CLUSTER_FILE",
            help="cluster.json written by `clustercert demo` (or its directory).",
        ),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _client(options: dict[str, Any]) -> ApiClient:
    from clustercert.client import ApiClient, Connection

    connection = Connection.resolve(
        options.pop("url"),
        options.pop("user"),
        options.pop("password"),
        options.pop("ca_file"),
        options.pop("cluster_file"),
    )
    return ApiClient(connection)


def _console() -> Any:
    """A console for tables on stdout: on a terminal, fitted to it; otherwise (a pipe, a file)
    wide enough that no value is cut short."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000)


def _fingerprint(value: str) -> str:
    """A SHA-256 cell: shortened on a terminal only, where a person reads it."""
    return value[:16] + "…" if sys.stdout.isatty() else value


def _echo_json(answer: Any) -> None:
    click.echo(json.dumps(answer, indent=2))


def _print_nodes(nodes: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table("node", "result", "serves (SHA-256)", "detail", box=None)
    for node in nodes:
        served = node.get("served_fingerprint")
        table.add_row(
            str(node.get("name")),
            "[green]ok[/green]" if node.get("ok") else "[red]FAILED[/red]",
            _fingerprint(served) if isinstance(served, str) else "-",
            str(node.get("error") or ""),
        )
    _console().print(table)


def _roll_out(
    client: ApiClient, method: str, path: str, body: Any, what: str, as_json: bool = False
) -> Any:
    """Run one rollout call while showing each node's progress (polled from
    ``GET /v1/cluster/certificates/rollout``, on stderr); on 409, show each node's outcome (or
    the error body, with ``as_json``), then fail."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as wait_for

    from rich.console import Console
    from rich.live import Live

    from clustercert.client import ApiClient

    console = Console(stderr=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(client.call, method, path, body)
        with (
            ApiClient(client.connection, timeout=5) as watcher,
            Live(_progress_view(what, None), console=console, transient=True) as live,
        ):
            while not wait_for([call], timeout=0.2).done:
                live.update(_progress_view(what, _progress(watcher)))
    try:
        return call.result()
    except ClusterCertError as exc:
        if as_json and exc.nodes is not None:
            _echo_json(exc.to_body())
        elif exc.nodes:
            _print_nodes(exc.nodes)
        raise


def _progress(watcher: ApiClient) -> dict[str, Any] | None:
    try:
        answer = watcher.call("GET", "/v1/cluster/certificates/rollout")
    except ClusterCertError:
        return None  # an older server, or another control plane runs it: no live view
    return answer if isinstance(answer, dict) and answer.get("in_progress") else None


def _progress_view(what: str, progress: dict[str, Any] | None) -> Any:
    from rich.table import Table

    if progress is None:
        return f"{what}: validating, waiting for the cluster lock..."
    nodes: dict[str, str] = progress.get("nodes", {})
    done = sum(1 for state in nodes.values() if state == "verified")
    table = Table(
        "node", "state", box=None,
        title=f"{what}: {progress.get('phase')} — {done}/{len(nodes)} nodes verified",
    )  # fmt: skip
    for node, state in sorted(nodes.items()):
        table.add_row(node, state)
    return table


def _read(path: Path | None) -> str | None:
    """A file's text; ``-`` reads standard input."""
    if path is None:
        return None
    return sys.stdin.read() if str(path) == "-" else path.read_text()


@certificates.command("list")
@client_options
def list_certificates(**options: Any) -> None:
    """A table of the cluster's certificates and how many nodes serve each."""
    from rich.table import Table

    as_json = options.pop("as_json")
    with _client(options) as client:
        present = client.call("GET", "/v1/cluster/certificates")
        names = sorted(k[: -len("_cert")] for k in present if k.endswith("_cert"))
        details = [client.call("GET", f"/v1/cluster/certificates/{n}") for n in names]
    if as_json:
        _echo_json(details)
        return
    table = Table("name", "subject", "expires in", "SHA-256", "nodes in sync", box=None)
    now = utc_now()
    for detail in details:
        not_after = parse_iso(detail["not_after"])
        nodes = detail["nodes"]
        in_sync = sum(1 for n in nodes if n["in_sync"])
        table.add_row(
            detail["name"],
            detail["subject"],
            f"{(not_after - now).days} days",
            _fingerprint(detail["fingerprint_sha256"]),
            f"{in_sync}/{len(nodes)}",
        )
    _console().print(table)


@certificates.command("show")
@click.argument("name")
@client_options
def show_certificate(name: str, **options: Any) -> None:
    """Metadata of one certificate and what each node serves (never the key), as JSON."""
    options.pop("as_json")  # always JSON
    with _client(options) as client:
        click.echo(json.dumps(client.call("GET", f"/v1/cluster/certificates/{name}"), indent=2))


@certificates.command("set")
@click.argument("name")
@click.option(
    "--cert", "cert_file", required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False, allow_dash=True),
    help="The certificate (PEM): the leaf first, then its intermediates. - reads stdin.",
)  # fmt: skip
@click.option(
    "--key", "key_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False, allow_dash=True),
    help="Its private key (PEM, unencrypted); required for every name but mtls_trusted_ca and "
    "sso_issuer, which take none. - reads stdin.",
)  # fmt: skip
@client_options
def set_certificate(name: str, cert_file: Path, key_file: Path | None, **options: Any) -> None:
    """Replace the certificate NAME on every node (PUT /v1/cluster/update_cert): validated,
    staged on every node, then switched everywhere, or nowhere if a node cannot stage it."""
    as_json = options.pop("as_json")
    if str(cert_file) == "-" and str(key_file) == "-":
        raise click.UsageError("only one of --cert and --key can read standard input (-)")
    body = {"name": name, "certificate": _read(cert_file), "key": _read(key_file)}
    with _client(options) as client:
        answer = _roll_out(
            client, "PUT", "/v1/cluster/update_cert", body, f"replacing {name}", as_json
        )
    if as_json:
        _echo_json(answer)
        return
    _print_nodes(answer["nodes"])
    for warning in answer.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{name} is now generation {answer['generation']} on every node "
        f"(SHA-256 {answer['fingerprint_sha256']})"
    )


@certificates.command("delete")
@click.argument("name")
@client_options
def delete_certificate(name: str, **options: Any) -> None:
    """Delete an optional certificate from the store and every node."""
    as_json = options.pop("as_json")
    with _client(options) as client:
        answer = _roll_out(
            client, "DELETE", f"/v1/cluster/certificates/{name}", None, f"deleting {name}",
            as_json,
        )  # fmt: skip
    if as_json:
        _echo_json(answer)
        return
    click.echo(f"{name} deleted from {len(answer['nodes'])} nodes")


@certificates.command("rotate")
@click.argument("name", required=False)
@client_options
def rotate_certificates(name: str | None, **options: Any) -> None:
    """Re-issue autogenerated certificates from the internal CA on every node."""
    as_json = options.pop("as_json")
    body = {"name": name} if name else {}
    with _client(options) as client:
        answer = _roll_out(
            client, "POST", "/v1/cluster/certificates/rotate", body, f"rotating {name or 'all'}",
            as_json,
        )  # fmt: skip
    if as_json:
        _echo_json(answer)
        return
    _print_nodes(answer["nodes"])
    for item in answer["certificates"]:
        click.echo(f"{item['name']}: generation {item['generation']}")


def _parse_moment(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dt.datetime | None:
    """An ISO 8601 time; without an offset it is UTC."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time such as 2030-01-31T12:00:00Z"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _read_upload(path: Path) -> str:
    # Undecodable bytes survive as surrogates, so DER and PKCS#12 files are recognised and
    # named by the validator instead of failing here.
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _load_ca_file(path: Path | None) -> list[x509.Certificate]:
    if path is None:
        return []
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise click.BadParameter(f"{path} holds no readable PEM certificates ({exc})") from None


def _shorten(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "(none)"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (+{len(items) - limit} more)"


@certificates.command("validate")
@click.option(
    "--name",
    default="api",
    show_default=True,
    help="Certificate name whose rules apply: " + ", ".join(NAMES) + ".",
)
@click.option(
    "--cert",
    "cert_file",
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
)
@click.option("--key", "key_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--at", "at", callback=_parse_moment, metavar="ISO8601", help="Validation time (default: now)."
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Extra trusted CA certificates (PEM), besides the system bundle.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def validate_certificate(
    name: str,
    cert_file: Path,
    key_file: Path | None,
    at: dt.datetime | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Check a certificate offline, exactly as PUT /v1/cluster/update_cert would.

    Exit status 0: valid; 1: rejected; 2: usage error. Nothing is sent anywhere.
    """
    from clustercert.validation import TrustStore, validate_upload

    moment = at or utc_now()  # the one place that reads the clock
    trust = TrustStore.system(extra=_load_ca_file(ca_file))
    key = _read_upload(key_file) if key_file is not None else None
    try:
        result = validate_upload(name, _read_upload(cert_file), key, at=moment, trust=trust)
    except (CertificateRejected, UnknownCertificate) as exc:
        if not as_json:
            raise  # main() prints it and picks the exit code
        report = {
            "valid": False,
            "http_status": exc.http_status,
            "error_code": exc.error_code,
            "description": exc.description,
            "warnings": [],
            "certificate": None,
        }
        click.echo(json.dumps(report))
        raise  # main() also prints it to stderr and picks the exit code
    summary = result.summary()
    if as_json:
        report = {
            "valid": True,
            "http_status": 200,
            "error_code": None,
            "description": f"the certificate passes every check for {name!r}",
            "warnings": list(result.warnings),
            "certificate": summary,
        }
        click.echo(json.dumps(report))
        return
    days_left = (result.not_after - moment).days
    lines = [
        f"valid: the certificate passes every check for {name!r}",
        f"  subject:     {summary['subject'] or '(empty)'}",
        f"  SANs:        {_shorten(pki.subject_alt_names(result.leaf))}",
        f"  issuer:      {summary['issuer']}",
        f"  validity:    {summary['not_before']} to {summary['not_after']} ({days_left} days left)",
        f"  key:         {summary['key_type']}",
        f"  chain:       {len(result.chain)} certificate(s), leaf first",
        f"  SHA-256:     {result.fingerprint_sha256}",
    ]
    lines.extend(f"warning: {w}" for w in result.warnings)
    click.echo("\n".join(lines))


@cli.group("cluster")
def cluster_group() -> None:
    """rladmin-style commands."""


@cluster_group.group("certificate")
def cluster_certificate() -> None:
    """rladmin-style certificate commands."""


@cluster_certificate.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("words", nargs=-1, required=True)
@client_options
def rladmin_set(name: str, words: tuple[str, ...], **options: Any) -> None:
    """NAME certificate_file F [key_file K] (rladmin syntax)."""
    pairs = dict(zip(words[::2], words[1::2], strict=False))
    unknown = set(pairs) - {"certificate_file", "key_file"}
    if len(words) % 2 or unknown or "certificate_file" not in pairs:
        raise click.UsageError(
            "expected: cluster certificate set NAME certificate_file FILE [key_file FILE]"
        )
    cert_path = Path(pairs["certificate_file"])
    key_path = Path(pairs["key_file"]) if "key_file" in pairs else None
    try:
        body = {"name": name, "certificate": cert_path.read_text(), "key": _read(key_path)}
    except OSError as exc:
        raise click.UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    as_json = options.pop("as_json")
    with _client(options) as client:
        answer = _roll_out(
            client, "PUT", "/v1/cluster/update_cert", body, f"replacing {name}", as_json
        )
    if as_json:
        _echo_json(answer)
        return
    click.echo(f"Set {name} certificate to contents of file {pairs['certificate_file']}")


# --- users (over the REST API) -------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Manage API users (admin and user_manager roles)."""


@users.command("add")
@click.option("--email", required=True)
@click.option(
    "--role", required=True,
    type=click.Choice(ROLE_NAMES),
)  # fmt: skip
@click.option("--name", default="", help="Display name.")
@click.option(
    "--new-password", envvar="CLUSTERCERT_NEW_PASSWORD",
    help="The new user's password (prompted for when neither this nor a subject is given).",
)  # fmt: skip
@click.option(
    "--certificate-subject-line",
    help='Client-certificate login instead of a password, e.g. "CN=alice,O=Example,C=US".',
)
@client_options
def add_user(
    email: str,
    role: str,
    name: str,
    new_password: str | None,
    certificate_subject_line: str | None,
    **options: Any,
) -> None:
    """Create a user (POST /v1/users)."""
    body: dict[str, Any] = {"email": email, "role": role, "name": name}
    if certificate_subject_line:
        body |= {"auth_method": "certificate", "certificate_subject_line": certificate_subject_line}
    else:
        body["password"] = new_password or click.prompt(
            f"password for {email}", hide_input=True, confirmation_prompt=True
        )
    as_json = options.pop("as_json")
    with _client(options) as client:
        user = client.call("POST", "/v1/users", body)
    if as_json:
        _echo_json(user)
        return
    click.echo(
        f"created user {user['uid']}: {user['email']} ({user['role']}, {user['auth_method']})"
    )


@users.command("list")
@client_options
def list_users(**options: Any) -> None:
    """A table of the users (never their password hashes)."""
    from rich.table import Table

    as_json = options.pop("as_json")
    with _client(options) as client:
        found = client.call("GET", "/v1/users")
    if as_json:
        _echo_json(found)
        return
    table = Table("uid", "email", "name", "role", "login", box=None)
    for user in found:
        login = user["auth_method"]
        if user.get("certificate_subject_line"):
            login += f" ({user['certificate_subject_line']})"
        table.add_row(str(user["uid"]), user["email"], user["name"], user["role"], login)
    _console().print(table)


@users.command("delete")
@click.argument("uid", type=int)
@client_options
def delete_user(uid: int, **options: Any) -> None:
    """Delete the user UID (DELETE /v1/users/UID)."""
    as_json = options.pop("as_json")
    with _client(options) as client:
        user = client.call("DELETE", f"/v1/users/{uid}")
    if as_json:
        _echo_json(user)
        return
    click.echo(f"deleted user {uid}: {user['email']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting (for in-process tests)."""
    try:
        # Without standalone mode click *returns* the code of ctx.exit(n) instead of raising.
        result = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ClusterCertError as exc:
        click.echo(f"error: {exc.error_code}: {exc.description}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
