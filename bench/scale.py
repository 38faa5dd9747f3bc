"""``make bench-scale``: the control plane with 100, 300 and 1,000 hollow nodes (bench/hollow.py).

    .venv/bin/python -m bench.scale [--sizes 100,300,1000] [--reps 5] [--idle-seconds 20]
                                    [--no-etcd | --only-etcd] [--watch-ms MS]
                                    [--doc docs/benchmarks.md | --no-doc]

One control plane (SQLite), nodes added in steps up to the largest size (the same cluster grows,
so joins are paid once); at each size: the idle control plane's CPU (no rotation running),
``reps`` rotations of ``proxy`` (p50, p95, control-plane CPU per node per rotation), and the
control plane's RSS. Then the largest size once more on an etcd store. Hollow nodes are a load
generator: they answer the internode protocol over real mutual TLS but reload and prove nothing,
so these figures are the control plane's, never an agent's.

The last line printed is the summary
``scale: n1000_p50_ms=.. n1000_cp_cpu_ms_per_node=.. n1000_idle_cpu_pct=.. n1000_rss_mb=..``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from bench import procstat
from bench.certs import Issuer, new_hierarchy
from bench.fleet import BenchCluster
from bench.report import update_doc
from bench.stats import Summary, summarize
from clustercert.clock import utc_now
from clustercert.control.reconcile import WATCH_RESYNC
from clustercert.control.state import run_blocking
from clustercert.demo import DemoCluster, free_port

__all__ = ["main"]

_PER_PROCESS = 250  # hollow nodes per process (one event loop each; see docs/benchmarks.md)
_PROJECT_TO = 10_000
_SETTLE_S = 5.0
_RESYNC_DEFAULT = WATCH_RESYNC  # the server's --watch-resync: a watch answers after 150-300 s
# The measured control planes run with watches that answer after 30-60 minutes, so that no
# watch answers while the idle base is measured (a run is shorter); their steady share at the
# default is added from the separately measured cost of one answer.
_RESYNC_QUIET = 3600.0
# The cost of one watch answer is measured apart, with this many nodes answering every 2-4 s:
_WATCH_PROBE_NODES, _WATCH_PROBE_RESYNC, _WATCH_PROBE_SECONDS = 100, 4.0, 15.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class SizeFigures:
    nodes: int
    store: str
    join_s: float
    sync_s: float
    latency: Summary
    cp_cpu_ms_per_node: float
    idle_base_pct: float  # measured: before any watch is due
    idle_cpu_pct: float  # idle_base_pct + the watches' share at the default resync
    rss_mb: float
    peak_rss_mb: float
    hollow_cpu_ms_per_node: float
    other_load_pct: float

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes, "store": self.store, "join_s": round(self.join_s, 1),
            "sync_s": round(self.sync_s, 1), "latency": self.latency.as_json(),
            "cp_cpu_ms_per_node": round(self.cp_cpu_ms_per_node, 3),
            "idle_base_pct": round(self.idle_base_pct, 2),
            "idle_cpu_pct": round(self.idle_cpu_pct, 2), "rss_mb": round(self.rss_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "hollow_cpu_ms_per_node": round(self.hollow_cpu_ms_per_node, 3),
            "other_load_pct": round(self.other_load_pct, 1),
        }  # fmt: skip


class EtcdServer:
    """A single-member etcd on loopback with its default timings, data in ``directory``."""

    def __init__(self, directory: Path) -> None:
        client, peer = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{client}/clustercert"
        self._log = (directory.parent / "etcd.log").open("wb")
        self.process = subprocess.Popen(
            ["etcd", "--name=bench", f"--data-dir={directory}",
             f"--listen-client-urls=http://127.0.0.1:{client}",
             f"--advertise-client-urls=http://127.0.0.1:{client}",
             f"--listen-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-cluster=bench=http://127.0.0.1:{peer}", "--log-level=error"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{client}/health", timeout=1).status_code == 200:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy; see {directory.parent / 'etcd.log'}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class HollowFleet:
    """The hollow processes of one cluster, and the nodes they play."""

    demo: DemoCluster
    work_dir: Path
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    nodes: int = 0

    def grow(self, total: int) -> float:
        """Add hollow nodes until ``total`` have joined; returns the seconds it took."""
        start = time.monotonic()
        count = total - self.nodes
        with self.demo.cluster.open_store() as store:
            state = self.demo.cluster.state(store)
            tokens = [
                run_blocking(state.new_join_token(utc_now(), dt.timedelta(hours=1)))
                for _ in range(count)
            ]
        names = [f"hollow-{self.nodes + i + 1}" for i in range(count)]
        started = []
        for first in range(0, count, _PER_PROCESS):
            spec = {
                "api_url": self.demo.api_url,
                "ca_file": str(self.demo.cluster.ca_file),
                "work_dir": str(self.work_dir),
                "nodes": [
                    {"name": n, "token": t}
                    for n, t in zip(
                        names[first : first + _PER_PROCESS],
                        tokens[first : first + _PER_PROCESS],
                        strict=True,
                    )
                ],
            }
            log = (self.work_dir / f"hollow-{len(self.processes)}.log").open("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.hollow"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
            assert process.stdin is not None
            process.stdin.write(json.dumps(spec))
            process.stdin.close()
            self.processes.append(process)
            started.append(process)
        for process in started:
            assert process.stdout is not None
            line = _read_line(process.stdout, timeout=600)
            if not line:
                raise RuntimeError(f"a hollow process exited with {process.poll()}; see its log")
            self.nodes += len(json.loads(line)["nodes"])
        return time.monotonic() - start

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _read_line(stream: IO[str], timeout: float) -> str:
    """One line from a child's stdout, or "" when it closed; bounded by ``timeout``."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no answer from a hollow process within {timeout} s")
    return stream.readline()


def _wait_in_sync(client: httpx.Client, nodes: int, timeout: float) -> float:
    start = time.monotonic()
    deadline = start + timeout
    lagging = nodes
    while time.monotonic() < deadline:
        listed = client.get("/v1/nodes").json()
        lagging = nodes - sum(1 for n in listed if n["in_sync"])
        if len(listed) >= nodes and lagging == 0:
            return time.monotonic() - start
        time.sleep(0.5)
    raise RuntimeError(f"{lagging} of {nodes} hollow nodes not in sync within {timeout} s")


def measure(
    cluster: BenchCluster, hollow: HollowFleet, store: str, reps: int, idle_seconds: float,
    join_s: float, sync_s: float, watch_ms: float, issuer: Issuer,
) -> SizeFigures:  # fmt: skip
    """One warm-up rotation (it opens the kept-alive connections; at the first size it also
    pins ``issuer``'s root on every node), a few seconds for the reconciler to see it, the idle
    CPU over ``idle_seconds`` (no rotation running, no watch answering: the base), then
    ``reps`` rotations. The idle figure adds the watches' steady share at the default resync:
    N answers every 0.75 x the resync on average, ``watch_ms`` each (:func:`measure_watch_cost`)."""
    pid, n = cluster.server_pid, hollow.nodes
    leaves = [issuer.issue() for _ in range(reps + 1)]
    cluster.rotate(leaves[0])
    time.sleep(_SETTLE_S)
    before = procstat.cpu_seconds(pid)
    time.sleep(idle_seconds)
    idle_base = 100 * (procstat.cpu_seconds(pid) - before) / idle_seconds
    watch_share = 100 * n / (0.75 * _RESYNC_DEFAULT) * watch_ms / 1000
    samples, cp_cpu, hollow_cpu = [], 0.0, 0.0
    machine_before = procstat.machine_busy_seconds()
    ours = [pid, *hollow.pids()]
    ours_before = sum(procstat.cpu_seconds(p) for p in ours)
    wall_start = time.perf_counter()
    for leaf in leaves[1:]:
        cp0 = procstat.cpu_seconds(pid)
        h0 = sum(procstat.cpu_seconds(p) for p in hollow.pids())
        samples.append(cluster.rotate(leaf))
        cp_cpu += procstat.cpu_seconds(pid) - cp0
        hollow_cpu += sum(procstat.cpu_seconds(p) for p in hollow.pids()) - h0
    wall = time.perf_counter() - wall_start
    others = (
        procstat.machine_busy_seconds() - machine_before
        - (sum(procstat.cpu_seconds(p) for p in ours) - ours_before)
    )  # fmt: skip
    time.sleep(_SETTLE_S)  # RSS once the last rotation has ended (the server trims after it)
    return SizeFigures(
        nodes=n,
        store=store,
        join_s=join_s,
        sync_s=sync_s,
        latency=summarize(samples),
        cp_cpu_ms_per_node=1000 * cp_cpu / reps / n,
        idle_base_pct=idle_base,
        idle_cpu_pct=idle_base + watch_share,
        rss_mb=_rss_mb(pid),
        peak_rss_mb=procstat.peak_rss_mb(pid),
        hollow_cpu_ms_per_node=1000 * hollow_cpu / reps / n,
        other_load_pct=max(0.0, 100 * others / (wall * (os.cpu_count() or 1))),
    )


def measure_watch_cost(parent: Path) -> float:
    """Control-plane CPU per watch answer, in ms: a short run in which every watch answers
    every 2-4 s, so nothing else the idle control plane does weighs."""
    resync = ("--watch-resync", str(_WATCH_PROBE_RESYNC))
    with control_plane("sqlite", parent, resync) as (cluster, hollow):
        hollow.grow(_WATCH_PROBE_NODES)
        _wait_in_sync(cluster.client, _WATCH_PROBE_NODES, timeout=120)
        time.sleep(_SETTLE_S)
        before = procstat.cpu_seconds(cluster.server_pid)
        time.sleep(_WATCH_PROBE_SECONDS)
        cpu = procstat.cpu_seconds(cluster.server_pid) - before
    answers = _WATCH_PROBE_NODES / (0.75 * _WATCH_PROBE_RESYNC) * _WATCH_PROBE_SECONDS
    return 1000 * cpu / answers


@contextlib.contextmanager
def control_plane(
    store: str, parent: Path, server_args: tuple[str, ...] = ()
) -> Iterator[tuple[BenchCluster, HollowFleet]]:
    """A control plane with no nodes (SQLite, or etcd started here), and its hollow fleet;
    everything stopped and removed on the way out."""
    directory = Path(tempfile.mkdtemp(prefix=f"scale-{store}-", dir=parent))
    etcd = EtcdServer(directory / "etcd-data") if store == "etcd" else None
    demo = DemoCluster(
        directory / "cluster",
        nodes_count=0,
        api_port=free_port(),
        console_port=free_port(),
        admin_password=secrets.token_urlsafe(16),
        store_url=etcd.url if etcd else None,
        server_args=server_args,
    )
    hollow = HollowFleet(demo, directory / "hollow")
    hollow.work_dir.mkdir(parents=True)
    try:
        demo.start(wait=60)
        with demo.client(timeout=300) as client:
            yield BenchCluster(demo, client), hollow
    finally:
        hollow.stop()
        demo.stop()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(directory, ignore_errors=True)


def run(
    sizes: Sequence[int],
    reps: int,
    idle_seconds: float,
    etcd: bool,
    sqlite: bool = True,
    watch_ms: float | None = None,
) -> tuple[list[SizeFigures], float]:
    figures = []
    parent = Path(tempfile.gettempdir())
    if watch_ms is None:
        watch_ms = measure_watch_cost(parent)
        _log(f"one watch answer costs the control plane {watch_ms:.2f} ms")
    runs = ([("sqlite", list(sizes))] if sqlite else []) + (
        [("etcd", [max(sizes)])] if etcd else []
    )
    for store, steps in runs:
        issuer = new_hierarchy("p256")  # one root per control plane: pinned once
        quiet = ("--watch-resync", str(_RESYNC_QUIET))
        with control_plane(store, parent, quiet) as (cluster, hollow):
            for n in steps:
                join_s = hollow.grow(n)
                sync_s = _wait_in_sync(cluster.client, n, timeout=600)
                _log(f"{store} N={n}: joined in {join_s:.0f} s, in sync {sync_s:.0f} s later")
                size = measure(
                    cluster, hollow, store, reps, idle_seconds, join_s, sync_s, watch_ms, issuer
                )
                _log(f"{store} N={n}: p50 {size.latency.p50:.0f} ms, p95 "
                     f"{size.latency.p95:.0f} ms, control plane {size.cp_cpu_ms_per_node:.2f} "
                     f"ms/node/rotation, idle {size.idle_cpu_pct:.1f} % of a core, RSS "
                     f"{size.rss_mb:.0f} MiB")  # fmt: skip
                figures.append(size)
    return figures, watch_ms


def project(figures: Sequence[SizeFigures], nodes: int) -> dict[str, float]:
    """Linear in N from the two largest SQLite sizes: rotation wall time, idle CPU, RSS."""
    sqlite = sorted((f for f in figures if f.store == "sqlite"), key=lambda f: f.nodes)
    a, b = sqlite[-2], sqlite[-1]

    def extend(fa: float, fb: float) -> float:
        return fb + (fb - fa) / (b.nodes - a.nodes) * (nodes - b.nodes)

    return {
        "p50_ms": extend(a.latency.p50, b.latency.p50),
        "idle_cpu_pct": extend(a.idle_cpu_pct, b.idle_cpu_pct),
        "rss_mb": extend(a.rss_mb, b.rss_mb),
    }


def render_markdown(
    figures: Sequence[SizeFigures], wall_s: float, reps: int, idle_s: float, watch_ms: float
) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### `make bench-scale` — {stamp}",
        "",
        f"Command: `make bench-scale` (`.venv/bin/python -m bench.scale`), {wall_s:.0f} s in "
        f"all; {reps} timed rotations per size after one warm-up. Hollow nodes (a load "
        "generator, not agents) share the 2 cores with the control plane. *Idle*: the control "
        f"plane's CPU over {idle_s:.0f} s with no rotation running and no watch answering (the "
        f"measured control planes run with `--watch-resync {_RESYNC_QUIET:.0f}`) (*base*), "
        "plus the watches' steady share at the default `--watch-resync` "
        f"({_RESYNC_DEFAULT:.0f} s: each node's watch answers every {_RESYNC_DEFAULT / 2:.0f}-"
        f"{_RESYNC_DEFAULT:.0f} s, {0.75 * _RESYNC_DEFAULT:.0f} s on average) at {watch_ms:.2f} ms "
        f"per answer, measured in the same run ({_WATCH_PROBE_NODES} nodes answering every "
        f"{_WATCH_PROBE_RESYNC / 2:.0f}-{_WATCH_PROBE_RESYNC:.0f} s for "
        f"{_WATCH_PROBE_SECONDS:.0f} s).",
        "",
        "| N | store | p50 | p95 | control-plane CPU / node / rotation | idle (base) "
        "| RSS (peak) | hollow CPU / node / rotation | joins | first sync | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.nodes} | {f.store} | {f.latency.p50:.0f} ms | {f.latency.p95:.0f} ms | "
            f"{f.cp_cpu_ms_per_node:.2f} ms | {f.idle_cpu_pct:.1f} % of a core "
            f"({f.idle_base_pct:.1f} %) | "
            f"{f.rss_mb:.0f} MiB ({f.peak_rss_mb:.0f}) | {f.hollow_cpu_ms_per_node:.2f} ms | "
            f"{f.join_s:.0f} s | {f.sync_s:.0f} s | {f.other_load_pct:.0f} % |"
        )
    if len([f for f in figures if f.store == "sqlite"]) >= 2:
        p = project(figures, _PROJECT_TO)
        lines += [
            "",
            f"Projection to {_PROJECT_TO:,} nodes (linear from the two largest SQLite sizes, "
            f"hollow nodes on the same cores): rotation p50 ≈ {p['p50_ms'] / 1000:.1f} s, idle "
            f"≈ {p['idle_cpu_pct']:.1f} % of a core, RSS ≈ {p['rss_mb']:.0f} MiB.",
        ]
    lines += ["", "```", render_line(figures), "```"]
    return "\n".join(lines)


def render_line(figures: Sequence[SizeFigures]) -> str:
    sqlite = [f for f in figures if f.store == "sqlite"]
    top = max(sqlite or figures, key=lambda f: f.nodes)  # --only-etcd: the etcd run
    n = f"{'' if sqlite else top.store + '_'}n{top.nodes}"
    return (
        f"scale: {n}_p50_ms={top.latency.p50:.0f} {n}_cp_cpu_ms_per_node="
        f"{top.cp_cpu_ms_per_node:.2f} {n}_idle_cpu_pct={top.idle_cpu_pct:.2f} "
        f"{n}_rss_mb={top.rss_mb:.0f}"
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: every process gets stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="100,300,1000", help="node counts, ascending")
    parser.add_argument("--reps", type=int, default=5, help="timed rotations per size")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd run")
    parser.add_argument(
        "--only-etcd", action="store_true", help="only the etcd run (at the largest size)"
    )
    parser.add_argument(
        "--watch-ms",
        type=float,
        help="the control plane's CPU per watch answer, from an earlier run: skips measuring it",
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-doc", action="store_true", help="do not touch the document")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited: N kept-alive sockets
    sizes = sorted(int(s) for s in args.sizes.split(","))
    started = time.monotonic()
    figures, watch_ms = run(
        sizes,
        args.reps,
        args.idle_seconds,
        etcd=not args.no_etcd,
        sqlite=not args.only_etcd,
        watch_ms=args.watch_ms,
    )
    markdown = render_markdown(
        figures, time.monotonic() - started, args.reps, args.idle_seconds, watch_ms
    )
    if args.json:
        args.json.write_text(json.dumps([f.as_json() for f in figures], indent=2) + "\n")
    print(markdown)
    if not args.no_doc:
        update_doc(args.doc, "bench-scale", markdown)
        _log(f"wrote the results into {args.doc}")
    print(render_line(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
