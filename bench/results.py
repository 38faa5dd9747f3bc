"""The figures a benchmark run produces, and the plan that says how many of each to take."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadResult
from bench.stats import Summary
from bench.validation_cost import ValidationCost

__all__ = ["LoadPhase", "Machine", "Plan", "Results", "SizeResult"]


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu_model: str
    memory_gib: float
    kernel: str
    python: str
    redis: str
    cryptography: str

    @classmethod
    def describe(cls) -> Machine:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
             if line.startswith("model name")), "unknown",
        )  # fmt: skip
        meminfo = Path("/proc/meminfo").read_text().split()
        memory = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024
        try:
            redis = (
                subprocess.run(
                    ["redis-server", "--version"], capture_output=True, text=True, timeout=10
                )
                .stdout.split()[2]
                .removeprefix("v=")
            )
        except (OSError, IndexError, subprocess.TimeoutExpired):
            redis = "unknown"
        import cryptography

        return cls(
            cores=os.cpu_count() or 0,
            cpu_model=model,
            memory_gib=round(memory, 1),
            kernel=platform.release(),
            python=platform.python_version(),
            redis=redis,
            cryptography=cryptography.__version__,
        )


@dataclass(frozen=True)
class Plan:
    name: str  # "bench" or "bench-quick": the make target, and the doc section it fills
    sizes: tuple[int, ...]
    repetitions: Mapping[int, int]
    warmup: int
    load_rotations: int
    load_workers: int
    validation_seconds: float

    @classmethod
    def quick(cls) -> Plan:
        return cls("bench-quick", (3, 30), {3: 30, 30: 20}, 3, 15, 8, 1.0)

    @classmethod
    def full(cls) -> Plan:
        return cls("bench", (3, 10, 30), {3: 100, 10: 60, 30: 50}, 5, 100, 8, 3.0)


@dataclass
class SizeResult:
    nodes: int
    startup_s: float
    latency: dict[str, Summary]
    cp_cpu_ms_per_node: float
    cp_cpu_raw_ms_per_node: float
    cp_idle_cpu_pct: float
    agent_cpu_ms_per_rotation: float
    floor_script_cpu_ms_per_node: float
    # redis-server's own CPU per node per turn (raw: its idle is ~1 % of a core): ours (the
    # reload, the verifying handshake, the replicas relinking to prove replication) and the
    # floor's (its reload and handshake), paid on the same cores outside either side's processes.
    redis_cpu_ms_per_node: float
    floor_redis_cpu_ms_per_node: float
    other_load_pct: float  # CPU used by processes outside this benchmark, % of all cores

    def ratio_floor(self) -> float:
        return self.latency["ours"].p50 / self.latency["floor"].p50

    def speedup(self) -> float:
        return self.latency["node_by_node"].p50 / self.latency["ours"].p50


@dataclass
class LoadPhase:
    nodes: int
    rotations: int
    latency: Summary
    result: LoadResult


@dataclass
class Results:
    plan: Plan
    machine: Machine
    sizes: list[SizeResult] = field(default_factory=list)
    load: LoadPhase | None = None
    validation: list[ValidationCost] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    store_put_ms: float = 0.0
    wall_s: float = 0.0

    def size(self, nodes: int) -> SizeResult | None:
        return next((s for s in self.sizes if s.nodes == nodes), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "machine": asdict(self.machine),
            "sizes": [
                {**{k: v for k, v in asdict(s).items() if k != "latency"},
                 "latency": {m: x.as_json() for m, x in s.latency.items()},
                 "ratio_floor": s.ratio_floor(), "speedup": s.speedup()}
                for s in self.sizes
            ],
            "load": None if self.load is None else {
                "nodes": self.load.nodes, "rotations": self.load.rotations,
                "latency": self.load.latency.as_json(), **asdict(self.load.result),
            },
            "validation": [
                {"key_type": v.key_type, "per_second": v.per_second, "ms_each": v.ms_each}
                for v in self.validation
            ],
            "rss_mb": self.rss_mb,
            "store_put_ms": self.store_put_ms,
            "wall_s": self.wall_s,
        }  # fmt: skip
