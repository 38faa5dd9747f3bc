"""Compare builds of clustercert side by side in one run: each build gets its own cluster (its
processes import clustercert from the given source directory), and their rotations take turns
with the floor baseline, so that a proposed change is judged against the same floor at the same
moment as the code it would replace.

    .venv/bin/python -m bench.compare --build before=/tmp/a/src --build after=/tmp/b/src \\
        [--nodes 3 --nodes 30] [--reps 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import procstat
from bench.baseline import Baselines
from bench.certs import new_hierarchy
from bench.fleet import BenchCluster, running_cluster
from bench.interleave import Contender, interleave
from bench.stats import summarize

__all__ = ["main"]


@contextlib.contextmanager
def _python_path(path: Path) -> Iterator[None]:
    """Processes started in this block import clustercert from ``path``."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def compare(builds: dict[str, Path], nodes: int, reps: int, warmup: int) -> str:
    issuer = new_hierarchy("p256")
    leaves = iter([issuer.issue() for _ in range((len(builds) + 1) * (reps + warmup))])
    with contextlib.ExitStack() as stack:
        clusters: dict[str, BenchCluster] = {}
        for name, path in builds.items():
            with _python_path(path):
                clusters[name] = stack.enter_context(running_cluster(nodes))
        first = next(iter(clusters.values()))
        baselines = Baselines(first.targets())
        stack.callback(baselines.close)
        contenders = [
            Contender(name, c.rotate, {"cp": [c.server_pid], "agents": c.agent_pids()})
            for name, c in clusters.items()
        ]
        contenders.append(Contender("floor", baselines.floor, {"self": []}))
        tallies = interleave(contenders, leaves, reps, warmup)
        rss = {
            name: (
                procstat.peak_rss_mb(c.server_pid),
                max(procstat.peak_rss_mb(pid) for pid in c.agent_pids()),
            )
            for name, c in clusters.items()
        }
    floor = summarize(tallies["floor"].samples)
    lines = [
        f"N={nodes}, {reps} rounds; floor p50 {floor.p50:.1f} ms, p95 {floor.p95:.1f} ms",
        f"{'build':<16} {'p50 ms':>8} {'p95 ms':>8} {'/floor':>7} {'cp ms/node':>11} "
        f"{'agent ms/node':>14} {'cp MiB':>7} {'agent MiB':>9}",
    ]
    for name in builds:
        tally = tallies[name]
        s = summarize(tally.samples)
        lines.append(
            f"{name:<16} {s.p50:>8.1f} {s.p95:>8.1f} {s.p50 / floor.p50:>7.2f} "
            f"{tally.net_cpu_ms_per_turn('cp') / nodes:>11.2f} "
            f"{tally.net_cpu_ms_per_turn('agents') / nodes:>14.2f} "
            f"{rss[name][0]:>7.0f} {rss[name][1]:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("--build", action="append", required=True, metavar="NAME=SRC_DIR",
                        help="a name and a directory holding a clustercert package")  # fmt: skip
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    builds: dict[str, Path] = {}
    for spec in args.build:
        name, _, directory = spec.partition("=")
        path = Path(directory).resolve()
        if not (path / "clustercert" / "__init__.py").exists():
            parser.error(f"{path} holds no clustercert package")
        builds[name] = path
    for nodes in args.nodes or [3]:
        print(compare(builds, nodes, args.reps, args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
