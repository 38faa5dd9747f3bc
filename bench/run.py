"""``make bench`` / ``make bench-quick``: rotation latency against node count and against the
baselines measured in the same run, control-plane CPU, client load, validation cost, memory.

    .venv/bin/python -m bench.run [--quick] [--doc docs/benchmarks.md | --no-doc] [--json F]
                                  [--profile DIR]

The last line printed is the summary ``bench: n3_p50_ms=.. ratio_floor3=.. ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import procstat
from bench.baseline import Baselines
from bench.certs import SERVER_NAME, Issuer, new_hierarchy
from bench.fleet import BenchCluster, running_cluster
from bench.interleave import Contender, interleave
from bench.load import LoadConfig, LoadPool
from bench.profile import py_spy
from bench.report import render_line, render_markdown, update_doc
from bench.results import LoadPhase, Machine, Plan, Results, SizeResult
from bench.stats import summarize
from bench.store_cost import measure_store_put_ms
from bench.validation_cost import measure_validation

__all__ = ["main"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_size(
    cluster: BenchCluster, issuer: Issuer, plan: Plan, profile: Path | None
) -> SizeResult:
    """Interleave our rotation with both baselines, ``repetitions`` times (after a warm-up), on
    the same redis-servers; the order of the three rotates so drift affects all alike."""
    n = cluster.size
    reps = plan.repetitions[n]
    leaves = iter([issuer.issue() for _ in range(3 * (plan.warmup + reps))])
    baselines = Baselines(cluster.targets())
    redis = cluster.redis_pids()
    groups = {"cp": [cluster.server_pid], "agents": cluster.agent_pids(), "redis": redis}
    ours = Contender("ours", cluster.rotate, groups)
    contenders = [
        ours,
        Contender("floor", baselines.floor, {"self": [], "redis": redis}),
        Contender("node_by_node", baselines.node_by_node, {"self": []}),
    ]
    everything = [cluster.server_pid, *cluster.agent_pids(), *redis]
    profiling = contextlib.nullcontext() if profile is None else py_spy(
        profile / f"n{n}", {"server": cluster.server_pid, "agent": cluster.agent_pids()[0]}
    )  # fmt: skip
    try:
        machine_before = procstat.machine_busy_seconds()
        ours_before = sum(procstat.cpu_seconds(p) for p in everything) + time.process_time()
        start = time.perf_counter()
        with profiling:
            tallies = interleave(contenders, leaves, reps, plan.warmup)
        wall = time.perf_counter() - start
        ours_used = (
            sum(procstat.cpu_seconds(p) for p in everything) + time.process_time() - ours_before
        )
        others = procstat.machine_busy_seconds() - machine_before - ours_used
    finally:
        baselines.close()
    mine = tallies["ours"]
    return SizeResult(
        nodes=n,
        startup_s=0.0,
        latency={name: summarize(t.samples) for name, t in tallies.items()},
        cp_cpu_ms_per_node=mine.net_cpu_ms_per_turn("cp") / n,
        cp_cpu_raw_ms_per_node=mine.raw_cpu_ms_per_turn("cp") / n,
        cp_idle_cpu_pct=100 * mine.idle_cpu_share("cp"),
        agent_cpu_ms_per_rotation=mine.net_cpu_ms_per_turn("agents") / n,
        floor_script_cpu_ms_per_node=tallies["floor"].raw_cpu_ms_per_turn("self") / n,
        # Raw: the redis-servers are shared, so one side's "idle" turns are the other's work.
        redis_cpu_ms_per_node=mine.raw_cpu_ms_per_turn("redis") / n,
        floor_redis_cpu_ms_per_node=tallies["floor"].raw_cpu_ms_per_turn("redis") / n,
        other_load_pct=max(0.0, 100 * others / (wall * (os.cpu_count() or 1))),
    )


def measure_load(cluster: BenchCluster, issuer: Issuer, plan: Plan, workdir: Path) -> LoadPhase:
    """``load_rotations`` rotations while a bounded client pool connects to every node."""
    leaves = [issuer.issue() for _ in range(plan.load_rotations)]
    bench_ca = workdir / "bench-root.pem"
    bench_ca.write_text(issuer.root_pem)
    cert_file, key_file = cluster.demo.redis_client
    config = LoadConfig(
        ports=tuple(t.tls_port for t in cluster.targets()),
        cafiles=(str(bench_ca), str(cluster.ca_file)),
        server_name=SERVER_NAME,
        client_cert=(str(cert_file), str(key_file)),
        workers=plan.load_workers,
        max_connections=500_000,
        max_seconds=600.0,
    )
    pool = LoadPool(config)
    pool.start()
    latencies: list[float] = []
    try:
        time.sleep(0.5)  # let the pool reach its pace before the first rotation
        for leaf in leaves:
            latencies.append(cluster.rotate(leaf))
        time.sleep(0.5)
    finally:
        result = pool.stop()
    return LoadPhase(cluster.size, len(leaves), summarize(latencies), result)


def run(plan: Plan, profile: Path | None) -> Results:
    started = time.monotonic()
    results = Results(plan, Machine.describe())
    for key_type in ("p256", "rsa2048"):
        cost = measure_validation(key_type, max_seconds=plan.validation_seconds)
        _log(f"validation {key_type}: {cost.per_second:.0f}/s ({cost.ms_each:.2f} ms each)")
        results.validation.append(cost)
    results.store_put_ms = measure_store_put_ms()
    _log(f"one durable store write: {results.store_put_ms:.2f} ms")
    issuer = new_hierarchy("p256")
    for n in plan.sizes:
        t0 = time.monotonic()
        with running_cluster(n) as cluster:
            startup = time.monotonic() - t0
            _log(f"N={n}: cluster up in {startup:.1f} s; measuring {plan.repetitions[n]} reps")
            size = measure_size(cluster, issuer, plan, profile)
            size.startup_s = startup
            results.sizes.append(size)
            lat = size.latency
            _log(f"N={n}: ours p50 {lat['ours'].p50:.1f} ms, floor {lat['floor'].p50:.1f} ms, "
                 f"node-by-node {lat['node_by_node'].p50:.1f} ms; ratio_floor "
                 f"{size.ratio_floor():.2f}, speedup {size.speedup():.2f}, control-plane CPU "
                 f"{size.cp_cpu_ms_per_node:.2f} ms/node")  # fmt: skip
            if n == max(plan.sizes):
                workdir = cluster.demo.directory
                results.load = measure_load(cluster, issuer, plan, workdir)
                load = results.load.result
                _log(f"load: {load.connections} connections, {load.failures} failures "
                     f"during {plan.load_rotations} rotations")  # fmt: skip
                results.rss_mb = {
                    "control_plane": procstat.peak_rss_mb(cluster.server_pid),
                    "agent_max": max(procstat.peak_rss_mb(p) for p in cluster.agent_pids()),
                    "redis_max": max(procstat.peak_rss_mb(p) for p in cluster.redis_pids()),
                }
    results.wall_s = time.monotonic() - started
    return results


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: every process gets stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=3 and 30, fewer repetitions")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"),
                        help="the document whose results section is rewritten")  # fmt: skip
    parser.add_argument("--no-doc", action="store_true", help="do not touch the document")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy profiles of the control plane "
        "and one agent during the timed rotations, into this directory",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan.quick() if args.quick else Plan.full()
    results = run(plan, args.profile)
    if args.json:
        args.json.write_text(json.dumps(results.as_json(), indent=2) + "\n")
    markdown = render_markdown(results)
    print(markdown)
    if not args.no_doc:
        update_doc(args.doc, plan.name, markdown)
        _log(f"wrote the results into {args.doc}")
    print(render_line(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
