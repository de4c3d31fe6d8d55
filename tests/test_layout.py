"""The house's rules, read from the code's own imports (imports inside functions counted): the
runtime imports none of the tools, the apps reach no tool, and no two modules import each other
round about. docs/architecture.md states them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcycle", "fedcycle_tools")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    """Each module's imports of the two packages' modules, wherever in the file they stand."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for target in names:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_runtime_imports_no_tool_and_the_apps_reach_none():
    graph = imports()
    runtime = {name: targets for name, targets in graph.items() if name.split(".")[0] == "fedcycle"}
    assert runtime and len(graph) > len(runtime)
    assert {(m, t) for m, targets in runtime.items() for t in targets if t.startswith("fedcycle_tools")} == set()
    for app in ("fedcycle.server_app", "fedcycle.client_app"):
        assert not {m for m in reachable(graph, app) if m.startswith("fedcycle_tools")}, app


def test_no_module_reaches_itself_through_its_imports():
    graph = imports()
    # a package's __init__ and its own submodules importing each other is Python's usual layout
    circles = sorted(name for name in graph if any(
        name in reachable(graph, target) and not (target.startswith(name + ".") or name.startswith(target + "."))
        for target in graph[name]))
    assert circles == []
