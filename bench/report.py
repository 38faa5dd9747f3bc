"""Turns a run's figures into the summary line, a Markdown section, and that section's place in
``docs/benchmarks.md`` (between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from bench.results import Results

__all__ = ["marginal_cp_ms", "project_latency_ms", "render_line", "render_markdown", "update_doc"]


def _fmt(value: float) -> str:
    """Three significant figures at most, no more decimals than meaningful."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def marginal_cp_ms(results: Results) -> float:
    """Control-plane CPU per additional node per rotation: the slope of its CPU per rotation
    between the smallest and the largest N (fixed per-rotation costs such as validation,
    authentication and the store's decision cancel out)."""
    small, large = results.size(min(results.plan.sizes)), results.size(max(results.plan.sizes))
    assert small is not None and large is not None
    total_small = small.cp_cpu_ms_per_node * small.nodes
    total_large = large.cp_cpu_ms_per_node * large.nodes
    return (total_large - total_small) / (large.nodes - small.nodes)


def project_latency_ms(results: Results, nodes: int, *, store: bool = True) -> float:
    """On paper, one rotation across ``nodes`` nodes on separate machines: node work runs in
    parallel there, so what grows with N is the control plane's serial part, its CPU per node
    (:func:`marginal_cp_ms`) and, with ``store``, one durable store write per node. Starts from
    the measured p50 at the smallest N."""
    small = results.size(min(results.plan.sizes))
    assert small is not None
    per_node = marginal_cp_ms(results) + (results.store_put_ms if store else 0.0)
    return small.latency["ours"].p50 + (nodes - small.nodes) * per_node


def render_line(results: Results) -> str:
    small, large = results.size(3), results.size(max(results.plan.sizes))
    assert small is not None and large is not None
    load = results.load
    parts = [
        f"n3_p50_ms={_fmt(small.latency['ours'].p50)}",
        f"ratio_floor3={small.ratio_floor():.2f}",
        f"n{large.nodes}_p50_ms={_fmt(large.latency['ours'].p50)}",
        f"ratio_floor{large.nodes}={large.ratio_floor():.2f}",
        f"speedup{large.nodes}={large.speedup():.2f}",
        f"cp_cpu_ms_per_node={large.cp_cpu_ms_per_node:.2f}",
        f"load_conns={load.result.connections if load else 0}",
        f"load_failures={load.result.failures if load else 0}",
    ]
    return "bench: " + " ".join(parts)


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_markdown(results: Results) -> str:
    plan, machine = results.plan, results.machine
    lines = [
        f"### `make {plan.name}` — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `make {plan.name}` (`.venv/bin/python -m bench.run"
        f"{' --quick' if plan.name == 'bench-quick' else ''}`), {results.wall_s:.0f} s in all.",
        f"Machine: {machine.cores} cores, {machine.cpu_model}, {machine.memory_gib} GiB, "
        f"Linux {machine.kernel}, Python {machine.python}, redis-server {machine.redis}, "
        f"cryptography {machine.cryptography}. Every process (control plane, agents, "
        "redis-servers, baselines, load) shares these cores. *Other load*: CPU used meanwhile "
        "by processes outside the benchmark, as a share of all cores.",
        "",
        "#### Rotation latency (`PUT /v1/cluster/update_cert`, `proxy`) and baselines, in ms",
        "",
        "| N | reps | ours p50 | ours p95 | floor p50 | floor p95 | node-by-node p50 "
        "| ours / floor | node-by-node / ours | cluster start | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results.sizes:
        lat = s.latency
        lines.append(
            f"| {s.nodes} | {lat['ours'].count} | {_fmt(lat['ours'].p50)} "
            f"| {_fmt(lat['ours'].p95)} | {_fmt(lat['floor'].p50)} | {_fmt(lat['floor'].p95)} "
            f"| {_fmt(lat['node_by_node'].p50)} | {s.ratio_floor():.2f} | {s.speedup():.2f} "
            f"| {s.startup_s:.0f} s | {s.other_load_pct:.0f} % |"
        )
    lines += [
        "",
        "#### CPU per node per rotation, in ms",
        "",
        "| N | control plane (net of idle) | control plane (raw) | control plane idle "
        "| agent (net of idle) | floor script | redis-server, ours | redis-server, floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results.sizes:
        lines.append(
            f"| {s.nodes} | {s.cp_cpu_ms_per_node:.2f} | {s.cp_cpu_raw_ms_per_node:.2f} "
            f"| {s.cp_idle_cpu_pct:.1f} % of a core | {s.agent_cpu_ms_per_rotation:.2f} "
            f"| {s.floor_script_cpu_ms_per_node:.2f} | {s.redis_cpu_ms_per_node:.2f} "
            f"| {s.floor_redis_cpu_ms_per_node:.2f} |"
        )
    large = results.size(max(plan.sizes))
    small = results.size(3)
    assert large is not None and small is not None
    lines += [
        "",
        "#### Projection on paper to fleets of separate machines",
        "",
        f"Marginal control-plane CPU per node per rotation {marginal_cp_ms(results):.2f} ms "
        f"(slope between N={small.nodes} and N={large.nodes}); one durable store write (each "
        f"node's proof is recorded with one, serially) {results.store_put_ms:.2f} ms. "
        f"T(N) = T({small.nodes}) + (N - {small.nodes}) x (CPU + store write): "
        f"100 nodes ≈ {_fmt(project_latency_ms(results, 100))} ms, "
        f"1,000 nodes ≈ {_fmt(project_latency_ms(results, 1000))} ms "
        f"(CPU alone: {_fmt(project_latency_ms(results, 100, store=False))} ms and "
        f"{_fmt(project_latency_ms(results, 1000, store=False))} ms). "
        f"Background: the control plane idles at {large.cp_idle_cpu_pct:.1f} % of a core with "
        f"{large.nodes} nodes (it watches the nodes known in sync instead of polling them; "
        "`make bench-scale` measures it at 1,000 nodes).",
    ]
    if results.load is not None:
        load = results.load
        r = load.result
        lines += [
            "",
            f"#### Under load (N={load.nodes}, {load.rotations} rotations)",
            "",
            f"{plan.load_workers} client threads opened {r.connections} new verified TLS "
            f"connections ({r.connections / r.seconds:.0f}/s over {r.seconds:.1f} s) and sent "
            f"{r.commands} PINGs: {r.failed_connections} failed connections, "
            f"{r.failed_commands} failed commands. Rotation latency under load: p50 "
            f"{_fmt(load.latency.p50)} ms, p95 {_fmt(load.latency.p95)} ms.",
        ]
        if r.errors:
            lines += ["", "First errors:", "", *(f"- `{e}`" for e in r.errors)]
    lines += ["", "#### Validation cost (chains of length 3: leaf, intermediate, root)", ""]
    lines += ["| key type | validations/s | ms each | share of N=3 p50 | share of N=30 p50 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for v in results.validation:
        lines.append(
            f"| {v.key_type} | {v.per_second:.0f} | {v.ms_each:.2f} "
            f"| {100 * v.ms_each / small.latency['ours'].p50:.1f} % "
            f"| {100 * v.ms_each / large.latency['ours'].p50:.1f} % |"
        )
    rss = results.rss_mb
    if rss:
        lines += [
            "",
            f"#### Peak memory (VmHWM) at N={large.nodes}",
            "",
            f"Control plane {rss['control_plane']:.0f} MiB, largest agent "
            f"{rss['agent_max']:.0f} MiB, largest redis-server {rss['redis_max']:.0f} MiB.",
        ]
    load_r = results.load.result if results.load else None
    lines += [
        "",
        "#### Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| ours / floor ≤ 1.5 at N=3 | {small.ratio_floor():.2f} "
        f"| {_check(small.ratio_floor() <= 1.5)} |",
        f"| ours / floor ≤ 1.5 at N={large.nodes} | {large.ratio_floor():.2f} "
        f"| {_check(large.ratio_floor() <= 1.5)} |",
        f"| control-plane CPU ≤ 2 ms per node per rotation | {large.cp_cpu_ms_per_node:.2f} "
        f"| {_check(large.cp_cpu_ms_per_node <= 2.0)} |",
    ]
    if load_r is not None:
        lines.append(
            f"| 0 failures under load, ≥ 1,000 connections | {load_r.failures} failures, "
            f"{load_r.connections} connections "
            f"| {_check(load_r.failures == 0 and load_r.connections >= 1000)} |"
        )
    if rss:
        lines += [
            f"| control plane RSS ≤ 100 MB | {rss['control_plane']:.0f} MiB "
            f"| {_check(rss['control_plane'] <= 100)} |",
            f"| agent RSS ≤ 60 MB | {rss['agent_max']:.0f} MiB "
            f"| {_check(rss['agent_max'] <= 60)} |",
        ]
    lines += ["", "```", render_line(results), "```"]
    return "\n".join(lines)


def update_doc(path: Path, name: str, section: str) -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path``
    with ``section``; append the markers and section if they are not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
