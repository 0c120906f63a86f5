"""The layering the README's Layout section states: no import cycles, and a broker that needs nothing of the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "virnucpro")
# The one module of virnucpro the broker may use: the weight table and weighted placement.
BROKER_MAY_IMPORT = {"virnucpro.pipeline.gpu_weights"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports anywhere in its body, lazy imports included."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in found:
                # `from pkg import module` names a module; `from module import name` names the module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            # A package's __init__ is imported with each of its modules; an edge to it is not a use.
            if module.startswith(target + "."):
                continue
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_broker_imports_from_virnucpro_only_the_weight_table():
    graph = import_graph()
    used = {target for module, targets in graph.items() if module.split(".")[0] == "broker"
            for target in targets if target.split(".")[0] == "virnucpro"}
    assert used - {"virnucpro", "virnucpro.pipeline"} == BROKER_MAY_IMPORT
