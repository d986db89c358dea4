"""The app's import graph goes one way: nothing imports upward and there is no cycle.

Every ``import`` of ``apps/sam_med3d`` (module level and inside functions: a deferred import hides a cycle, it does
not remove it) is read with ``ast``, without importing anything. Each module gets the layer of the longest
prefix listed in :data:`LAYERS`; a module may import its own package's modules and modules of lower layers only.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from app_helpers import APP_DIR

#: Module name prefix -> layer (low first). Packages of one layer do not import each other.
LAYERS: Dict[str, int] = {
    # What every part of the app uses.
    "lib.errors": 0,
    "lib.options": 0,
    "lib.validation": 1,
    "lib.served_model": 1,  # the hot-reloading served model: a runtime object the tasks share
    "lib.result_response": 1,
    "lib.upstream_fixes._routes": 1,
    "lib.upstream_fixes.datastore_index": 1,  # a base class of the app's datastores, not installed by main
    # MONAI Label task classes and datastores.
    "lib.infers": 2,
    "lib.trainers": 2,
    "lib.activelearning": 2,
    "lib.datastore": 2,
    "lib.ohif": 2,
    # Building the tasks from the options.
    "lib.configs": 3,
    # Fixes of MONAI Label installed on the running server (they may use everything below).
    "lib.upstream_fixes": 4,
    "main": 5,
}


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in sorted(APP_DIR.rglob("*.py")):
        parts = list(path.relative_to(APP_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """App modules that ``name`` imports (``from lib import x`` counts as ``lib.x`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "lib":
                found.add(target)
    return found


def _layer(name: str) -> Tuple[str, int]:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{name} has no layer in LAYERS: add it"
    return prefix, LAYERS[prefix]


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name != "lib"}


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    wrong = []
    for name, targets in sorted(graph.items()):
        own_prefix, own = _layer(name)
        for target in sorted(targets):
            prefix, layer = _layer(target)
            if layer > own or (layer == own and prefix != own_prefix):
                wrong.append(f"{name} (layer {own}) imports {target} (layer {layer})")
    return wrong


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found, state = [], {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_is_read():
    graph = _graph()
    assert "lib.configs.sam_med3d" in graph["main"] and "lib.infers.sam_med3d" in graph["lib.configs.sam_med3d"]
    assert "lib.upstream_fixes.request_guard" in graph["lib.upstream_fixes"]  # deferred imports count


def test_nothing_in_the_app_imports_upward():
    assert upward_imports(_graph()) == []


def test_the_app_has_no_import_cycle():
    assert cycles(_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = _graph()
    graph["lib.infers.sam_med3d"] = graph["lib.infers.sam_med3d"] | {"lib.configs.sam_med3d"}
    assert upward_imports(graph) == ["lib.infers.sam_med3d (layer 2) imports lib.configs.sam_med3d (layer 3)"]
    assert ["lib.configs.sam_med3d", "lib.infers.sam_med3d", "lib.configs.sam_med3d"] in cycles(graph)
