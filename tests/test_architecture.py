"""The house stays one-way: the floors of ``src/camanim`` import downwards only, with no cycles, and no
camanim module is imported inside a function (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "camanim"

#: Floors from the bottom up; a module may import its own floor and the floors below it.
FLOORS = ("foundation", "compute", "pipelines", "outputs", "cli", "top")


def floor_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__", "_compat"):
        return "top"
    if parts[1] in ("errors", "version"):
        return "foundation"
    if parts[1] in FLOORS:
        return parts[1]
    raise AssertionError(f"{module} lies outside the floors {FLOORS}: give it a home in one of them")


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(path: Path, module: str, known: set[str]) -> list[tuple[str, bool, int]]:
    """``(imported camanim module, inside a function?, line)`` for every import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("camanim"):
                target = resolve(name)
                if target and target != module:
                    out.append((target, id(node) in in_function, node.lineno))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool, int]]]:
    mods = modules()
    return {m: imports(f, m, set(mods)) for m, f in mods.items()}


def test_every_module_has_a_floor(graph):
    for module in graph:
        floor_of(module)


def test_imports_point_down(graph):
    upward = [
        f"{m}:{line} imports {t} ({floor_of(m)} -> {floor_of(t)})"
        for m, edges in graph.items()
        for t, _, line in edges
        if FLOORS.index(floor_of(t)) > FLOORS.index(floor_of(m))
    ]
    assert upward == []


def test_no_camanim_imports_inside_functions(graph):
    inside = [f"{m}:{line} imports {t}" for m, edges in graph.items() for t, fn, line in edges if fn]
    assert inside == []


def test_no_import_cycles(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _, _ in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The AST walk itself: a compute module importing a pipeline, inside a function, is caught."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from camanim.pipelines.explain import explain\n")
    found = imports(f, "camanim.compute.m", {"camanim.compute.m", "camanim.pipelines.explain"})
    assert found == [("camanim.pipelines.explain", True, 2)]
    assert FLOORS.index(floor_of(found[0][0])) > FLOORS.index(floor_of("camanim.compute.m"))


def test_old_module_paths_warn_and_give_the_same_objects():
    """Code written against the old layout keeps working (each old module warns once, when imported)."""
    import importlib
    import sys
    import warnings

    import camanim
    from camanim._compat import MOVED
    from camanim.pipelines.explain import explain
    from camanim.pipelines.ybroad import ybroad

    for old in MOVED:
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_explanation = importlib.import_module("camanim.explanation")
        from camanim.road import ybroad as old_ybroad  # the function, as before
    assert old_explanation.explain is explain and old_ybroad is ybroad
    assert {str(w.message).split(" has moved")[0] for w in caught} >= {"camanim.explanation", "camanim.road"}
    assert all(issubclass(w.category, DeprecationWarning) for w in caught)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for old, new in MOVED.items():  # every old name resolves, and every target exists
                module = importlib.import_module(old)
                assert [m.__name__ for m in module._modules()] == list(new)
    finally:  # leave no old sub-module bound to its old parent for the tests that follow
        for old in MOVED:
            sys.modules.pop(old, None)
    assert camanim.explain is explain and camanim.ybroad is ybroad
