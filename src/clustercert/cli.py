"""The ``clustercert`` command. ``main(argv)`` is testable in-process.

Errors from the one tree (:mod:`clustercert.errors`) become exit codes in one place: ``main``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from clustercert.errors import ClusterCertError

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="clustercert")
def cli() -> None:
    """Replace TLS certificates on every node of a cluster, safely, with one call."""


@cli.group()
def certificates() -> None:
    """Inspect, validate and replace the cluster's certificates."""


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
