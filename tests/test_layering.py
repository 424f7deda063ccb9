"""The package's import structure: no cycles, and no part importing a part above it.

Every `import difftrain...` in the source counts, including the ones inside functions
(deferred imports are still dependencies). The picture, bottom to top:

    leaf (errors, atomic, versions, run_folder, sampling, cache)  <- anyone may import these
    data -> models -> generate -> evaluate, serve, export  (using a model: never training's internals)
    data, models, evaluate -> curate                    (filtering a data set with CLIP and friends)
    generate, evaluate -> export                       (the int8 gate's CLIP score is evaluate's)
                   -> { config, training, methods }   (training a model; evaluation during training
                                                         measures through evaluate)
    cli, the package's own __init__                    (on top of everything)
"""

from __future__ import annotations

import ast
from pathlib import Path

import difftrain

PACKAGE = Path(difftrain.__file__).parent
LEAF = {"errors", "atomic", "versions", "run_folder", "sampling", "cache"}
GROUP = {"config": "run", "training": "run", "methods": "run"}
# group -> the groups it may import (besides itself and the leaf)
ALLOWED = {
    "leaf": set(),
    "data": set(),
    "models": {"data"},
    "run": {"data", "models", "evaluate"},
    "generate": {"data", "models"},
    "evaluate": {"data", "models", "generate"},
    "serve": {"data", "models", "generate"},
    "export": {"data", "models", "generate", "evaluate"},
    "curate": {"data", "models", "evaluate"},
    "top": {"data", "models", "run", "generate", "evaluate", "serve", "export", "curate"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "top"
    return "leaf" if parts[1] in LEAF else GROUP.get(parts[1], parts[1])


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's own modules that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = list(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "difftrain.training.trainer" in graph
    assert "difftrain.sampling.images" in graph["difftrain.training.trainer"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_imports():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        group = group_of(module)
        for target in sorted(targets):
            other = group_of(target)
            if other not in ("leaf", group) and other not in ALLOWED[group]:
                wrong.append(f"{module} ({group}) imports {target} ({other})")
    assert not wrong, "imports against the layering:\n  " + "\n  ".join(wrong)


def test_the_checker_catches_what_it_should():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert group_of("difftrain.sampling.schedulers") == "leaf"
    assert group_of("difftrain.methods.text2image") == "run"
    assert group_of("difftrain") == "top"
