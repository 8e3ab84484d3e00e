"""The package has no import cycle: the graph of every `lmdistill` import (module-level and inside
functions alike) between the package's modules is acyclic, and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmdistill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports anywhere in its source (a `from pkg import mod` counts as mod)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)
            if node.module in MODULES and len(submodules) < len(node.names):  # names defined in the module
                found.add(node.module)
    return found - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf():
    assert imports_of("lmdistill.config") == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_first_in_a_fresh_interpreter(name):
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, capture_output=True, timeout=120)


# The layers, top to bottom: a module may import its own layer and those below, never one above.
LAYERS = {
    "commands and the experiment runner": ["lmdistill", "lmdistill.cli", "lmdistill.demo", "lmdistill.compare",
                                           "lmdistill.cache_teacher", "lmdistill.generate"],
    "the training loop": ["lmdistill.trainer", "lmdistill.setup", "lmdistill.optim", "lmdistill.run_state",
                          "lmdistill.model_card", "lmdistill.check"],
    "methods": ["lmdistill.methods"],
    "teachers and tasks": ["lmdistill.teacher", "lmdistill.instruct", "lmdistill.reasoning", "lmdistill.draft"],
    "losses, models, data, config": [],  # everything else
}


def layer_of(name: str) -> int:
    """The index in LAYERS of the first layer whose prefixes hold `name` (a package or one of its modules)."""
    for i, prefixes in enumerate(LAYERS.values()):
        if any(name == p or (p != "lmdistill" and name.startswith(p + ".")) for p in prefixes):
            return i
    return len(LAYERS) - 1


def test_imports_run_one_way_down_the_layers():
    """Commands on top, then the loop, then methods, then teachers/tasks, then losses/models/data/config:
    no import (module-level or inside a function) reaches a layer above its own, and config.py, the
    schema every layer reads, imports no lmdistill module."""
    names = list(LAYERS)
    upward = [f"{m} ({names[layer_of(m)]}) imports {d} ({names[layer_of(d)]})"
              for m in sorted(MODULES) for d in sorted(imports_of(m)) if layer_of(d) < layer_of(m)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)
    assert not imports_of("lmdistill.config"), imports_of("lmdistill.config")


def test_the_layering_places_each_kind_of_module():
    """The check above can fail: a method importing the trainer, or a loss importing a method, would be
    an upward import under this placement."""
    assert [layer_of(m) for m in ("lmdistill.cli", "lmdistill.compare.runner", "lmdistill.cache_teacher",
                                  "lmdistill.generate", "lmdistill.trainer", "lmdistill.methods.kd",
                                  "lmdistill.teacher.served", "lmdistill.teacher.cache",
                                  "lmdistill.teacher.generation", "lmdistill.losses.chunked", "lmdistill.config")
            ] == [0, 0, 0, 0, 1, 2, 3, 3, 3, 4, 4]
    assert layer_of("lmdistill.trainer") < layer_of("lmdistill.methods.kd") < layer_of("lmdistill.losses")
