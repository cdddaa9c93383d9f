"""The package's shape: no import loop, short functions, the training loop in a short engine module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bgmask"
MAX_FUNCTION_LINES = 60


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the bgmask modules it imports, at the top or inside functions."""
    mods = module_names()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[name].add(target if target in mods else base)
        graph[name] &= set(mods)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_loop():
    graph = import_graph()
    assert graph["bgmask.engine"] >= {"bgmask.build", "bgmask.checkpoint"}  # the parser sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("name", sorted(module_names()))
def test_functions_are_short(name):
    path = module_names()[name]
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {', '.join(long)}"


def test_engine_keeps_only_the_loop():
    assert len((PACKAGE / "engine.py").read_text().splitlines()) < 300


MAX_TOP_LEVEL_MODULES = 16
MAX_FILE_LINES = 450
# The demo composes two other applications through their public entries: the report's write_report and,
# for --mask_sweep, the sweep's sweep_config / sweep_to_folder.
COMPOSED = {("demo", "report"), ("demo", "sweep")}


def test_library_and_applications_are_apart():
    """bgmask/ holds the library's modules (at most 16 at the top); the applications live in bgmask/apps/
    and import the library, never each other's internals (cli, the `bgmask` command, wires them up)."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    graph = import_graph()
    library = {m for m in graph if not m.startswith("bgmask.apps") and m != "bgmask.__main__"}
    assert not [(m, t) for m in library for t in graph[m] if t.startswith("bgmask.apps")]
    apps = {m for m in graph if m.startswith("bgmask.apps.")}

    def app(module):  # demo_plots and demo_seg are parts of the demo
        return module.rsplit(".", 1)[-1].split("_")[0]

    crossing = [(m, t) for m in apps for t in graph[m] & apps if m != "bgmask.apps.cli" and app(t) != app(m)
                and (app(m), app(t)) not in COMPOSED]
    assert not crossing


@pytest.mark.parametrize("name", sorted(module_names()))
def test_files_are_short(name):
    path = module_names()[name]
    assert len(path.read_text().splitlines()) <= MAX_FILE_LINES, path
