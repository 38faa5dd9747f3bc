"""The ``clustercert`` command. ``main(argv)`` is testable in-process.

Errors from the one tree (:mod:`clustercert.errors`) become exit codes in one place: ``main``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from clustercert.agent.app import run_agent
from clustercert.agent.config import load_agent_config
from clustercert.cluster import ClusterDirectory, init_cluster
from clustercert.control.server import ServerSettings, serve
from clustercert.demo import run_demo
from clustercert.errors import ClusterCertError

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
    result = init_cluster(
        directory,
        name=name,
        admin_email=admin_email,
        admin_password=admin_password,
        now=dt.datetime.now(dt.UTC),
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
def server(
    directory: Path,
    listen: str,
    store: str | None,
    agent_timeout: float,
    lock_wait: float,
    reconcile_interval: float,
) -> None:
    """Run the control plane (REST API over HTTPS) until SIGINT/SIGTERM."""
    _setup_logging()
    host, port = _listen(listen)
    settings = ServerSettings(
        host=host,
        port=port,
        store=store,
        agent_timeout=agent_timeout,
        lock_wait=lock_wait,
        reconcile_interval=reconcile_interval,
    )
    asyncio.run(serve(ClusterDirectory(directory), settings))


@cli.command("join-token")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--ttl", default=3600, show_default=True, help="Seconds the token stays valid.")
def join_token(directory: Path, ttl: int) -> None:
    """Print a one-time token with which one node joins."""
    cluster = ClusterDirectory(directory)
    with cluster.open_store() as store:
        token = cluster.state(store).new_join_token(
            dt.datetime.now(dt.UTC), dt.timedelta(seconds=ttl)
        )
    click.echo(token)


@cli.command()
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path))
def agent(config_file: Path) -> None:
    """Run the node agent (joins on first start) until SIGINT/SIGTERM."""
    _setup_logging()
    run_agent(load_agent_config(config_file))


@cli.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--dir", "directory", default=".clustercert-demo", show_default=True,
    type=click.Path(path_type=Path),
)  # fmt: skip
@click.option("--port", default=9443, show_default=True, help="API port.")
def demo(nodes: int, directory: Path, port: int) -> None:
    """Start a local cluster (control plane, N agents, N redis-server) until Ctrl-C."""
    run_demo(directory, nodes, port)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting (for in-process tests)."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ClusterCertError as exc:
        click.echo(f"error: {exc.error_code}: {exc.description}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
