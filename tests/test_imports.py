"""The one-way flow of docs/design.md §2, read off the source: no import cycles, and no stage imports a later one.

Every ``import`` counts, including those inside functions (a lazy import is still a dependency).  Importing
``a.b.c`` also runs the ``__init__`` of ``a.b``, so that package counts as imported too (unless the importer
is inside it already); a cycle through a package ``__init__`` fails the test like a cycle between modules.
"""

import ast
import graphlib
from pathlib import Path

import pytest

import mambascope

ROOT = Path(mambascope.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _targets(node: ast.AST, name: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        here = name.split(".") if is_package else name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (directly, or through the parent packages' __init__)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, name, path.name == "__init__.py", modules):
                if target.split(".")[0] != root.name:
                    continue
                while target not in modules:  # `from a.b import function` -> a.b
                    target = target.rsplit(".", 1)[0]
                parts = target.split(".")
                parents = (".".join(parts[:i]) for i in range(2, len(parts)))
                graph[name] |= {t for t in (target, *parents) if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def _in(module: str, *prefixes: str) -> bool:
    return any(module == f"mambascope.{p}" or module.startswith(f"mambascope.{p}.") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_graph_sees_lazy_and_package_imports(graph):
    # the graph is only worth something if it sees imports inside functions and through package __init__s
    assert "mambascope.attention_neurons" in graph["mambascope.pipeline"]  # imported inside run_analysis
    assert "mambascope.report" in graph["mambascope.cli"]
    assert {"mambascope.trace", "mambascope.trace.forward"} <= graph["mambascope.runner"]


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_ssm_is_math_on_tensors(graph):
    outside = {(m, t) for m, deps in graph.items() if _in(m, "ssm") for t in deps if not _in(t, "ssm")}
    assert not outside, f"ssm/ imports other mambascope modules: {sorted(outside)}"


def test_only_the_cli_the_report_and_serve_import_the_report(graph):
    # serve (the explorer) comes after the report: it renders the report's templates
    offenders = {(m, t) for m, deps in graph.items() for t in deps
                 if _in(t, "report") and not _in(m, "report", "serve", "cli")}
    assert not offenders, f"an earlier stage imports the report: {sorted(offenders)}"


def test_only_the_cli_imports_serve(graph):
    offenders = {(m, t) for m, deps in graph.items() for t in deps if _in(t, "serve") and not _in(m, "serve", "cli")}
    assert not offenders, f"only the CLI starts the explorer: {sorted(offenders)}"


def test_nothing_but_the_entry_point_imports_the_cli(graph):
    assert [m for m, deps in graph.items() if "mambascope.cli" in deps] == ["mambascope.__main__"]
