"""The event loop every long-running clustercert process (control plane, agent) runs on.

uvloop: libuv's loop, with its TLS transport written in C. Both processes spend most of their
CPU moving TLS records between sockets and Python (internode calls, the API, verifying
handshakes); on asyncio's pure-Python SSL protocol that cost twice as much per request
(docs/benchmarks.md, "Scale"; the choice is in docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new uvloop event loop (like :func:`asyncio.run`)."""
    return uvloop.run(main)
