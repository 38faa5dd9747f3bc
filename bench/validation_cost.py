"""What validation (DESIGN §5) costs: uploads validated per second, in this process, for chains
of length 3 (leaf, intermediate, root, all uploaded) of one key type."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from bench.certs import KeyType, new_hierarchy

__all__ = ["ValidationCost", "measure_validation"]


@dataclass(frozen=True)
class ValidationCost:
    key_type: KeyType
    validations: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.validations / self.seconds

    @property
    def ms_each(self) -> float:
        return 1000 * self.seconds / self.validations


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
    validate_upload("proxy", leaves[0].full_chain_pem, leaves[0].key_pem, at=at, trust=trust)
    count = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    while count < max_count and (count < 10 or time.perf_counter() < deadline):
        leaf = leaves[count % distinct]
        validate_upload("proxy", leaf.full_chain_pem, leaf.key_pem, at=at, trust=trust)
        count += 1
    return ValidationCost(key_type, count, time.perf_counter() - start)
