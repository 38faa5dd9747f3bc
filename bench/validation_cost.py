"""What validation (DESIGN §5) costs: uploads validated per second, in this process, for chains
of length 3 (leaf, intermediate, root, all uploaded) of one key type; and what its last step,
the client's-eye handshake (``clustercert.handshake``), adds to it.

    .venv/bin/python -m bench.validation_cost [seconds per measurement, default 3]
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, get_args

from bench.certs import KeyType, LeafPair, new_hierarchy

__all__ = ["ValidationCost", "measure_handshake", "measure_validation"]

T = TypeVar("T")


@dataclass(frozen=True)
class ValidationCost:
    key_type: KeyType
    validations: int
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time: steadier than wall time on a busy host

    @property
    def per_second(self) -> float:
        return self.validations / self.seconds

    @property
    def ms_each(self) -> float:
        return 1000 * self.seconds / self.validations

    @property
    def cpu_ms_each(self) -> float:
        return 1000 * self.cpu_seconds / self.validations


def _round_robin(
    key_type: KeyType,
    items: Sequence[T],
    work: Callable[[T], object],
    max_seconds: float,
    max_count: int,
) -> ValidationCost:
    """Run ``work`` on ``items`` in turn (once untimed to warm up) for about ``max_seconds``."""
    work(items[0])
    count = 0
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + max_seconds
    while count < max_count and (count < 10 or time.perf_counter() < deadline):
        work(items[count % len(items)])
        count += 1
    wall = time.perf_counter() - start
    return ValidationCost(key_type, count, wall, time.process_time() - cpu)


def measure_validation(
    key_type: KeyType, *, max_seconds: float, max_count: int = 100_000, distinct: int = 8
) -> ValidationCost:
    """Validate ``distinct`` different uploads round-robin for about ``max_seconds``, against the
    trust store the control plane uses (the system bundle plus extra CAs)."""
    from clustercert.validation import TrustStore, validate_upload

    issuer = new_hierarchy(key_type)
    leaves = [issuer.issue() for _ in range(distinct)]
    trust = TrustStore.system()
    at = dt.datetime.now(dt.UTC)

    def validate(leaf: LeafPair) -> object:
        return validate_upload("proxy", leaf.full_chain_pem, leaf.key_pem, at=at, trust=trust)

    return _round_robin(key_type, leaves, validate, max_seconds, max_count)


def measure_handshake(
    key_type: KeyType,
    *,
    as_client: bool = False,
    max_seconds: float,
    max_count: int = 100_000,
    distinct: int = 8,
) -> ValidationCost:
    """The client's-eye handshake alone, as validation runs it for one upload: as the server
    (``proxy``, ``api``...) or, with ``as_client``, as the client certificate (``ldap_client``;
    names needing both EKUs pay both)."""
    from clustercert import handshake

    issuer = new_hierarchy(key_type)
    leaves = [issuer.issue() for _ in range(distinct)]

    def shake(leaf: LeafPair) -> object:
        if as_client:
            return handshake.refusal_as_client(leaf.chain_pem, leaf.key_pem, issuer.root_pem)
        return handshake.refusal_as_server(
            leaf.chain_pem, leaf.key_pem, issuer.root_pem, "redis.example"
        )

    return _round_robin(key_type, leaves, shake, max_seconds, max_count)


def main(argv: Sequence[str]) -> None:
    seconds = float(argv[0]) if argv else 3.0
    print("ms per upload, CPU time (wall time in parentheses)\n")
    print("| key type | validation of a `proxy` upload (with its handshake) | handshake as "
          "server | handshake as client | server handshake share of validation |")  # fmt: skip
    print("|---|---|---|---|---|")
    for key_type in get_args(KeyType):
        whole = measure_validation(key_type, max_seconds=seconds)
        server = measure_handshake(key_type, max_seconds=seconds)
        client = measure_handshake(key_type, as_client=True, max_seconds=seconds)
        print(
            f"| {key_type} | {whole.cpu_ms_each:.2f} ({whole.ms_each:.2f}) "
            f"| {server.cpu_ms_each:.2f} ({server.ms_each:.2f}) "
            f"| {client.cpu_ms_each:.2f} ({client.ms_each:.2f}) "
            f"| {100 * server.cpu_ms_each / whole.cpu_ms_each:.0f} % |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
