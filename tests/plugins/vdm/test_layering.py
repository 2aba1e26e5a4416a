"""The import layering of ``plugins/genkit_vdm``: its modules import each other in one
direction (no cycle), counting every import in a module, at its top or inside a function, but
not those under ``if TYPE_CHECKING:``; the shared ``base`` module builds on neither model."""

from __future__ import annotations

import ast
from pathlib import Path

import genkit_vdm

PACKAGE = "genkit_vdm"
ROOT = Path(genkit_vdm.__file__).resolve().parent
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _targets(node: ast.Import | ast.ImportFrom, modules: list[str]) -> set[str]:
    """The package's modules that one import statement loads (``__init__`` for the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level > 1:  # above the package
        return set()
    else:
        prefix = PACKAGE if node.level == 1 else ""
        module = ".".join(part for part in (prefix, node.module or "") if part)
        if module != PACKAGE:
            names = [module]
        else:  # ``from genkit_vdm import x``: a submodule, or a name of the package
            names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        found.add(parts[1] if len(parts) > 1 and parts[1] in modules else "__init__")
    return found


def imports_of(source: str, modules: list[str], *, type_checking: bool = False) -> set[str]:
    """The package's modules that ``source`` imports anywhere in its tree; the ones under
    ``if TYPE_CHECKING:`` only with ``type_checking``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.update(_targets(node, modules))
        if isinstance(node, ast.If) and not type_checking and _is_type_checking(node.test):
            children: list[ast.AST] = list(node.orelse)
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            visit(child)

    visit(ast.parse(source))
    return found


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself left out)."""
    graph = {}
    for name in MODULES:
        source = (ROOT / f"{name}.py").read_text(encoding="utf-8")
        graph[name] = imports_of(source, MODULES, type_checking=type_checking) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_parser_counts_function_level_imports_and_skips_type_checking_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import genkit_vdm.schedules\n"
        "from genkit_vdm import sampling, VDM\n"
        "from .draws import draw_uniforms\n"
        "if TYPE_CHECKING:\n"
        "    from genkit_vdm.model import VDM\n"
        "else:\n"
        "    from genkit_vdm.ode import flow_time\n"
        "def f():\n"
        "    if True:\n"
        "        from genkit_vdm.estimators import DenoisingMatchingELBO\n"
    )
    modules = ["draws", "estimators", "model", "ode", "sampling", "schedules"]
    runtime = {"schedules", "sampling", "__init__", "draws", "ode", "estimators"}
    assert imports_of(source, modules) == runtime
    assert imports_of(source, modules, type_checking=True) == runtime | {"model"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"model", "continuous", "estimators", "sampling"} <= set(graph)
    cycle = find_cycle(graph)
    lines = "\n".join(f"  {name}: {', '.join(sorted(deps)) or '-'}" for name, deps in graph.items())
    assert cycle is None, f"genkit_vdm import cycle: {' -> '.join(cycle)}\nimports:\n{lines}"


def test_base_builds_on_neither_model():
    assert "base" in MODULES, "genkit_vdm has no base.py (what both models share)"
    below = reachable(import_graph(), "base")
    direct = import_graph(type_checking=True)["base"]
    for model in ("model", "continuous"):
        assert model not in below, f"base.py imports {model}.py (directly or through others)"
        assert model not in direct, f"base.py imports {model}.py under TYPE_CHECKING"
