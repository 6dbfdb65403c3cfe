"""The import graph of warm_jax: no module reaches itself, and `warm_jax/data/` is a library.

Every module under warm_jax/ is parsed (ast, nothing imported), function-local imports and
``importlib.import_module("literal")`` included: an import inside a function still makes the two
modules depend on each other, it only hides the cycle from the interpreter until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "warm_jax"

# What warm_jax/data/ (preference datasets, tokenizers, the built-in text) must not import: training, policies,
# stages, and the built-in task's stage that samples pairs from the pretrained policy.
DATA_FORBIDDEN = (
    "warm_jax.pretrain",
    "warm_jax.policy",
    "warm_jax.stages",
    "warm_jax.ensemble",
    "warm_jax.evaluation",
    "warm_jax.task",
)
# The `warm-data` CLI (python -m warm_jax.data) is an entry point like warm_jax.train: nothing imports it, and its
# `prepare --format=builtin` runs the built-in task's pair generation, so it may import the task module.
DATA_ENTRY_POINTS = ("warm_jax.data.__main__",)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """``name`` or its closest enclosing module that exists under warm_jax/ (``from pkg import function``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The warm_jax modules that the file at ``path`` imports anywhere in its body."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != me:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, modules, root) for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its first module) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c), c[0]) for c in components]


def _cycle_in(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path start → … → start inside one strongly connected component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def forbidden_data_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        if not mod.startswith("warm_jax.data") or mod in DATA_ENTRY_POINTS:
            continue
        for dep in sorted(deps):
            if any(dep == f or dep.startswith(f + ".") for f in DATA_FORBIDDEN):
                bad.append(f"{mod} imports {dep}")
    return bad


def test_no_module_imports_one_that_imports_it_back():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_is_a_library():
    bad = forbidden_data_imports(import_graph())
    assert not bad, "warm_jax/data/ must import no training, policy, stage or task module: " + "; ".join(bad)


# ----------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "warm_jax" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "warm_jax"


def test_finds_a_cycle_through_a_function_local_import(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from warm_jax import b\n",
            "b.py": "def f():\n    from warm_jax.c import g\n",
            "c.py": "import importlib\n\ndef g():\n    importlib.import_module('warm_jax.a')\n",
            "d.py": "from warm_jax import a\n",
        },
    )
    graph = import_graph(root)
    assert graph["warm_jax.b"] == {"warm_jax.c"} and graph["warm_jax.c"] == {"warm_jax.a"}
    assert find_cycles(graph) == [["warm_jax.a", "warm_jax.b", "warm_jax.c", "warm_jax.a"]]


def test_relative_and_package_imports_resolve(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "pkg/__init__.py": "from .sub import x\n",
            "pkg/sub.py": "from .. import top\nfrom warm_jax.pkg import other\n",
            "pkg/other.py": "",
            "top.py": "import warm_jax.pkg.sub\nfrom warm_jax.pkg import function_not_module\n",
        },
    )
    graph = import_graph(root)
    assert graph["warm_jax.pkg"] == {"warm_jax.pkg.sub"}
    assert graph["warm_jax.pkg.sub"] == {"warm_jax.top", "warm_jax.pkg.other"}
    assert graph["warm_jax.top"] == {"warm_jax.pkg.sub", "warm_jax.pkg"}
    assert find_cycles(graph) == [["warm_jax.pkg", "warm_jax.pkg.sub", "warm_jax.top", "warm_jax.pkg"]]


@pytest.mark.parametrize("forbidden", DATA_FORBIDDEN)
def test_flags_data_importing(tmp_path, forbidden):
    files = {"__init__.py": "", "data/__init__.py": "", "data/lib.py": f"def f():\n    import {forbidden}\n"}
    files[forbidden.removeprefix("warm_jax.").replace(".", "/") + ".py"] = ""
    graph = import_graph(_write(tmp_path, files))
    assert forbidden_data_imports(graph) == [f"warm_jax.data.lib imports {forbidden}"]
