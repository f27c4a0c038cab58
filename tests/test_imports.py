"""The project's modules import downward only: no import circles, and the worker side (jobs/) reaches into
the controller (orchestrator/) only for the shared schema, matrix and memory model. Parsed with ast, so
an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "jobs")
# what jobs/ may import from orchestrator/ (docs/architecture.md): the schema (and its dotted keys), the capability matrix and the
# planner are below both sides (orchestrator.config and orchestrator.planner are packages: their files count too, see
# shared()); jobs/entrypoint.py is a cluster job's `rayft train`, so it calls the controller
JOBS_MAY_IMPORT = {"orchestrator.config", "orchestrator.dotted", "orchestrator.architectures", "orchestrator.planner"}
ENTRYPOINT_MAY_IMPORT = {"orchestrator.launch", "orchestrator.remote"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in PACKAGES:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the project's modules
    assert cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_jobs_reach_into_the_controller_only_for_the_shared_parts():
    reaches = {
        (name, target)
        for name, targets in import_graph().items()
        if name.startswith("jobs.")
        for target in targets
        if target.startswith("orchestrator.")
        and not shared(target)
        and not (name == "jobs.entrypoint" and target in ENTRYPOINT_MAY_IMPORT)
    }
    assert reaches == set()


def shared(target: str) -> bool:
    """One of the shared parts, or a module of one (orchestrator.planner is a package: its files count too)."""
    return any(target == part or target.startswith(part + ".") for part in JOBS_MAY_IMPORT)


def test_planner_files_import_downward():
    """orchestrator/planner/: the walk finds its files, and each imports only the ones below it."""
    order = ["orchestrator.planner.shapes", "orchestrator.planner.memory", "orchestrator.planner.fit", "orchestrator.planner.render"]
    graph = import_graph()
    assert set(order) | {"orchestrator.planner"} <= set(graph)
    for k, name in enumerate(order):
        assert graph[name] & {"orchestrator.planner", *order} <= set(order[:k]), name
    assert shared("orchestrator.planner.fit") and not shared("orchestrator.plannerx")


# each package's files, lowest first: a file may import only the ones before it (never its package's __init__)
PACKAGE_ORDER = {
    "orchestrator.config": ["sections", "tune", "job", "problems", "checks", "load"],
    "orchestrator.search_report": ["memory", "labels", "frontier", "draw", "metrics_chart", "frontier_chart", "write"],
    "orchestrator.launch": ["outcome", "localray", "capacity", "progress", "record", "export", "data_checks", "run"],
}


def test_package_files_import_downward():
    """orchestrator/config/, orchestrator/search_report/ and orchestrator/launch/: the walk finds their files, and
    each imports only the ones below it; jobs/ may import the schema's files."""
    graph = import_graph()
    for package, names in PACKAGE_ORDER.items():
        order = [f"{package}.{name}" for name in names]
        assert set(order) | {package} == {name for name in graph if name == package or name.startswith(package + ".")}
        for k, name in enumerate(order):
            assert graph[name] & {package, *order} <= set(order[:k]), name
    assert shared("orchestrator.config.job") and not shared("orchestrator.configx")
