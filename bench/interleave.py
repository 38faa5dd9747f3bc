"""Interleaved measurement: several contenders (our rotation, the baselines, or two builds of
clustercert) take turns on fresh certificates, in a rotating order, so that whatever else the
machine does at the time weighs on all of them alike.

For each contender it records the wall time of every turn and the CPU time its processes used
during its own turns (busy) and during the other contenders' turns (idle: background work such
as the reconciler), so that the CPU a turn costs can be given net of that background.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from bench import procstat
from bench.certs import LeafPair

__all__ = ["Contender", "Tally", "interleave"]


@dataclass(frozen=True)
class Contender:
    name: str
    turn: Callable[[LeafPair], object]
    # Process groups whose CPU is charged to this contender, e.g. {"cp": [pid], "agents": [...]}.
    # The group "self" means this (the benchmark's) process, threads included.
    processes: Mapping[str, Sequence[int]] = field(default_factory=dict)


@dataclass
class Tally:
    samples: list[float] = field(default_factory=list)  # seconds per turn
    busy_wall: float = 0.0
    idle_wall: float = 0.0
    busy_cpu: dict[str, float] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)

    def net_cpu_ms_per_turn(self, group: str) -> float:
        """CPU ms one turn cost ``group``, less its background rate measured while idle."""
        busy = self.busy_cpu.get(group, 0.0)
        rate = self.idle_cpu.get(group, 0.0) / self.idle_wall if self.idle_wall else 0.0
        return 1000 * (busy - rate * self.busy_wall) / max(1, len(self.samples))

    def raw_cpu_ms_per_turn(self, group: str) -> float:
        return 1000 * self.busy_cpu.get(group, 0.0) / max(1, len(self.samples))

    def idle_cpu_share(self, group: str) -> float:
        """Background CPU of ``group`` as a share of one core."""
        return self.idle_cpu.get(group, 0.0) / self.idle_wall if self.idle_wall else 0.0


def _cpu(groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    out = {}
    for group, pids in groups.items():
        if group == "self":
            out[group] = time.process_time()
        else:
            out[group] = sum(procstat.cpu_seconds(pid) for pid in pids)
    return out


def interleave(
    contenders: Sequence[Contender],
    leaves: Iterator[LeafPair],
    repetitions: int,
    warmup: int,
    min_idle_ratio: float = 1.0,
) -> dict[str, Tally]:
    """``warmup`` untimed rounds, then ``repetitions`` rounds in which every contender takes
    one turn with its own fresh certificate; round i starts with contender i mod len.

    Afterwards, if some contender was idle for less than ``min_idle_ratio`` times its busy
    time, sleep until it was (only background work runs then), so its idle rate is measured
    over an interval at least as long as its busy one."""
    for _ in range(warmup):
        for contender in contenders:
            contender.turn(next(leaves))
    tallies = {c.name: Tally() for c in contenders}
    count = len(contenders)
    for i in range(repetitions):
        for k in range(count):
            current = contenders[(i + k) % count]
            leaf = next(leaves)
            before = {c.name: _cpu(c.processes) for c in contenders}
            start = time.perf_counter()
            current.turn(leaf)
            elapsed = time.perf_counter() - start
            after = {c.name: _cpu(c.processes) for c in contenders}
            for contender in contenders:
                tally = tallies[contender.name]
                busy = contender is current
                if busy:
                    tally.samples.append(elapsed)
                    tally.busy_wall += elapsed
                else:
                    tally.idle_wall += elapsed
                cpu = tally.busy_cpu if busy else tally.idle_cpu
                for group, value in after[contender.name].items():
                    cpu[group] = cpu.get(group, 0.0) + value - before[contender.name][group]
    missing = max(
        (min_idle_ratio * t.busy_wall - t.idle_wall for t in tallies.values()), default=0.0
    )
    if missing > 0:
        before = {c.name: _cpu(c.processes) for c in contenders}
        time.sleep(missing)
        after = {c.name: _cpu(c.processes) for c in contenders}
        for contender in contenders:
            tally = tallies[contender.name]
            tally.idle_wall += missing
            for group, value in after[contender.name].items():
                tally.idle_cpu[group] = (
                    tally.idle_cpu.get(group, 0.0) + value - before[contender.name][group]
                )
    return tallies
