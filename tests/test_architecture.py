"""The code's shape, checked from its source (issue 29): no import cycles, lazy imports say why, small
modules and functions, the torch-free runtime stays torch-free, and the README's Layout names every
module. Static (``ast``): nothing is imported, so these run in a second."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "edgekd"
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
# Allowed more parameters: typer commands (one per CLI option) and edgekd.testing.assert_latency, the
# public pytest API whose keyword arguments users' latency tests already pass (each typed and documented).
WIDE_BY_DESIGN = {("edgekd.testing", "assert_latency")}
TORCH_FREE = ("edgekd.runtime", "edgekd.atomic", "edgekd.errors", "edgekd")  # shipped in every bundle (bundle/make.py RUNTIME_FILES)


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: list[str]
    imports: list[tuple[str, ast.AST, bool]] = field(default_factory=list)  # (edgekd module, node, inside a function)


def _modules() -> dict[str, Module]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        src = p.read_text()
        out[".".join(parts)] = Module(".".join(parts), p, ast.parse(src), src.splitlines())
    for mod in out.values():
        _collect_imports(mod, out)
    return out


def _target(name: str, modules: dict[str, Module]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _collect_imports(mod: Module, modules: dict[str, Module]) -> None:
    in_function: set[int] = set()
    for fn in ast.walk(mod.tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name, modules) if name.startswith("edgekd") else None
            if target and target != mod.name:
                mod.imports.append((target, node, id(node) in in_function))


def _graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Import edges, function-level ones included; importing ``edgekd.pkg.sub`` from outside ``pkg``
    also runs ``edgekd/pkg/__init__.py``, so that is an edge too."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod in modules.values():
        for target, _, _ in mod.imports:
            graph[mod.name].add(target)
            parent = target.rpartition(".")[0]
            while parent.count(".") >= 1 and not mod.name.startswith(parent + ".") and mod.name != parent:
                graph[mod.name].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return _modules()


def test_no_import_cycle_among_edgekd_modules(modules):
    assert _cycles(_graph(modules)) == []


def test_the_cycle_finder_finds_a_cycle_a_lazy_import_hides():
    """The check can fail: a function-level back-import (what hid the cycles before) is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    mods = {"edgekd": None, "edgekd.x": None, "edgekd.y": None}
    fake_x = Module("edgekd.x", Path("x.py"), ast.parse("import edgekd.y\n"), [])
    fake_y = Module("edgekd.y", Path("y.py"), ast.parse("def f():\n    from edgekd.x import g\n"), ["def f():", "    from edgekd.x import g"])
    for m in (fake_x, fake_y):
        _collect_imports(m, mods)
    assert fake_y.imports[0][2] is True  # seen inside the function
    assert _cycles(_graph({"edgekd.x": fake_x, "edgekd.y": fake_y})) == [["edgekd.x", "edgekd.y"]]


def test_every_function_level_import_of_edgekd_says_why(modules):
    silent = sorted({f"{m.path.relative_to(ROOT)}:{node.lineno}" for m in modules.values() for _, node, inside in m.imports
                     if inside and "#" not in m.lines[node.lineno - 1] and "#" not in m.lines[node.end_lineno - 1]})
    assert silent == [], "a lazy import needs a comment: heavy optional dependency, the torch-free bundle, or --help speed"


def test_modules_and_functions_stay_small(modules):
    big = [f"{m.path.relative_to(ROOT)} ({len(m.lines)} lines)" for m in modules.values() if len(m.lines) > MAX_MODULE_LINES]
    long, wide = [], []
    for m in modules.values():
        for fn in ast.walk(m.tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"{m.path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(where)
            a = fn.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
            if count > MAX_PARAMETERS and not m.name.startswith("edgekd.commands.") and (m.name, fn.name) not in WIDE_BY_DESIGN:
                wide.append(f"{where} ({count} parameters)")
    assert (big, long, wide) == ([], [], [])


def test_the_bundle_runtime_imports_nothing_that_is_not_shipped(modules):
    """edgekd/runtime/ runs on the device from the bundle's own copy: it may import only what
    bundle/make.py ships (and never torch)."""
    from edgekd.bundle.make import RUNTIME_FILES

    shipped = {"edgekd." + f[:-3].replace("/__init__", "").replace("/", ".") if f != "__init__.py" else "edgekd" for f in RUNTIME_FILES}
    for m in (m for name, m in modules.items() if name.startswith("edgekd.runtime")):
        assert {t for t, _, _ in m.imports} <= shipped, m.name
        heavy = [n for n in ast.walk(m.tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 and any((getattr(n, "module", None) or a.name).split(".")[0] in ("torch", "timm", "modelopt") for a in n.names)]
        assert heavy == [], m.name
    assert {f"edgekd.{m.split('.')[1]}" for m in shipped if m.count(".") >= 1} <= {"edgekd.runtime", "edgekd.errors", "edgekd.atomic"}


def test_readme_layout_names_every_module(modules):
    """The README's Layout section matches the tree: every package and top-level module, and every
    module of a package, is named there; nothing it names is missing."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    missing = []
    for name, m in modules.items():
        rel = m.path.relative_to(PKG)
        if rel.name == "__init__.py" or rel.name == "__main__.py":
            continue
        shown = rel.name if len(rel.parts) > 1 else str(rel)
        if not re.search(rf"(?<!\w){re.escape(shown[:-3])}\.py\b", layout):
            missing.append(str(rel))
    named_dirs = set(re.findall(r"edgekd/(\w+)/", layout))
    real_dirs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert (missing, sorted(named_dirs - real_dirs), sorted(real_dirs - named_dirs)) == ([], [], [])
