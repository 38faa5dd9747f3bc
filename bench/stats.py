"""Percentiles of a sample of durations."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    """Durations in milliseconds."""

    count: int
    p50: float
    p95: float
    minimum: float
    maximum: float

    def as_json(self) -> dict[str, float]:
        return {"count": self.count, "p50_ms": round(self.p50, 2), "p95_ms": round(self.p95, 2),
                "min_ms": round(self.minimum, 2), "max_ms": round(self.maximum, 2)}  # fmt: skip


def summarize(seconds: Sequence[float]) -> Summary:
    """p50 and p95 (linear interpolation between order statistics) of ``seconds``, in ms."""
    if not seconds:
        raise ValueError("no samples")
    ms = sorted(s * 1000 for s in seconds)
    if len(ms) == 1:
        return Summary(1, ms[0], ms[0], ms[0], ms[0])
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return Summary(len(ms), statistics.median(ms), cuts[94], ms[0], ms[-1])
