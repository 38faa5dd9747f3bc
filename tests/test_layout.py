"""The package's import rules (docs/architecture.md): who may import whom.

Read from the source with ``ast`` (no import runs), counting every import statement, including
those inside functions and ``if TYPE_CHECKING:`` blocks: a cycle hidden in a function is still a
cycle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "clustercert"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def is_package_init_edge(source: str, target: str) -> bool:
    # A package's __init__ re-exporting its own modules is not a cycle a reader trips over.
    return target.startswith(source + ".") or source.startswith(target + ".")


def test_no_import_cycles() -> None:
    graph = {
        source: {t for t in targets if not is_package_init_edge(source, t)}
        for source, targets in import_graph().items()
    }
    assert find_cycles(graph) == []


def test_agent_and_control_plane_never_import_each_other() -> None:
    graph = import_graph()
    crossings = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        for mine, theirs in (("agent", "control"), ("control", "agent"))
        if source.startswith(f"{PACKAGE}.{mine}") and target.startswith(f"{PACKAGE}.{theirs}")
    ]
    assert crossings == []


def test_agents_never_import_the_console() -> None:
    """The console (web/) is part of the control plane: an agent loads none of it."""
    graph = import_graph()
    crossings = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source.startswith(f"{PACKAGE}.agent")
        for target in targets
        if target.startswith(f"{PACKAGE}.web")
    ]
    assert crossings == []


def test_shared_modules_import_neither_side() -> None:
    """Top-level modules used by both sides (files, TLS, PKI, messages) depend on neither."""
    graph = import_graph()
    sides = (f"{PACKAGE}.agent", f"{PACKAGE}.control")
    entry_points = {f"{PACKAGE}.cli", f"{PACKAGE}.demo", f"{PACKAGE}.__main__"}
    crossings = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source.count(".") == 1 and source not in entry_points and not source.startswith(sides)
        for target in targets
        if target.startswith(sides)
    ]
    assert crossings == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
