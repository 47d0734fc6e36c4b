"""cbscope's modules import each other without a circle, imports inside functions included.

Every module under ``cbscope/`` and ``app/`` is parsed with :mod:`ast` (nothing is imported),
and each ``import`` / ``from ... import`` anywhere in it (module level, functions, methods,
``try`` blocks) becomes an edge to the project module it names. Two kinds of import are left
out, since they never run: imports under ``if TYPE_CHECKING:``. Importing ``a.b.c`` runs the
``__init__`` of ``a`` and ``a.b`` first, so it is an edge to each of those packages too, except
the importing module's own packages (they are already being imported when it runs; an
``__init__`` that re-exports its submodules would otherwise be a circle by construction).
``from package import name`` is an edge to ``package.name`` when that is a module, to the module
a lazy package's ``_EXPORTS`` maps ``name`` to (``cbscope``, ``cbscope.organism``: their
``__getattr__`` imports it on first use), else to the package itself. ``app`` is mapped to
``cbscope.app``, the name it is installed under (see ``pyproject.toml``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cbscope": ROOT / "cbscope", "app": ROOT / "app"}
ALIASES = {"app": "cbscope.app"}  # the name app/ is installed under


def canonical(name: str) -> str:
    """A dotted module name with the ``app`` package under its installed name."""
    head, _, rest = name.partition(".")
    if head in ALIASES:
        return ALIASES[head] + ("." + rest if rest else "")
    return name


def project_modules() -> dict[str, Path]:
    """Every project module's (canonical) dotted name and file."""
    modules: dict[str, Path] = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[canonical(".".join(parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from`` import starts from."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def lazy_exports(path: Path) -> dict[str, str]:
    """A package ``__init__``'s ``_EXPORTS`` literal (name -> module), {} without one."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:
            return dict(ast.literal_eval(node.value))
    return {}


def import_graph() -> dict[str, set[str]]:
    """Edges ``module -> project modules it imports`` (see the module docstring for the rules)."""
    modules = project_modules()
    lazy = {name: lazy_exports(path) for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [canonical(alias.name) for alias in node.names]
            else:
                base = canonical(_base(module, path, node))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    exported = lazy.get(base, {}).get(alias.name)
                    targets.append(sub if sub in modules else canonical(exported or base))
            own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
            for target in targets:
                # `import a.b.c` runs a, a.b and a.b.c: every project module on the way
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):
                    name = ".".join(parts[:depth])
                    if name in modules and name not in own:
                        graph[module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle ``[a, b, ..., a]`` in ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return path[path.index(step):] + [step]
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph[step])))
    return None


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # `cbscope demo` imports the app launcher inside its function body
    assert "cbscope.commands.app" in graph["cbscope.commands.demo"]
    assert "cbscope.trace" in graph["cbscope.app.compute"]  # the app, under its installed name
    # a submodule import runs its package's __init__ (a circle through cbscope.attacks counts)
    assert "cbscope.attacks" in graph["cbscope.commands.evaluate"]


def test_lazy_exports_count_as_imports_of_their_modules() -> None:
    graph = import_graph()
    # `from cbscope.organism import World` (lazy) imports cbscope.organism.world only
    assert "cbscope.organism.world" in graph["cbscope.commands.demo"]
    assert "cbscope.organism.build" not in graph["cbscope.models"]  # resolving never builds


def test_find_cycle_reports_the_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_imports_do_not_count() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
                     "def f():\n    import y\n")
    assert [n.names[0].name for n in _imports(tree)] == ["TYPE_CHECKING", "y"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle is not None:
        pytest.fail("import circle: " + " -> ".join(cycle))


def test_lazy_packages_show_ides_what_they_export() -> None:
    """``cbscope`` and ``cbscope.organism`` list every lazy name three times: ``_EXPORTS``,
    ``__all__`` and a ``TYPE_CHECKING`` import from the same module; all three must agree,
    and each name must really be there."""
    import importlib

    for package in ("cbscope", "cbscope.organism"):
        path = project_modules()[package]
        exports = lazy_exports(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mirrored: dict[str, str] = {}
        for node in tree.body:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in ast.walk(node):
                    if isinstance(child, ast.ImportFrom) and child.module:
                        mirrored.update({a.asname or a.name: child.module for a in child.names})
        module = importlib.import_module(package)
        submodules = {name for name in mirrored if f"{package}.{name}" in project_modules()}
        assert {k: v for k, v in mirrored.items() if k not in submodules} == exports, package
        assert sorted(module.__all__) == sorted([*exports, *submodules]), package
        for name, source in exports.items():
            assert getattr(module, name) is getattr(importlib.import_module(source), name)


def test_import_cbscope_stays_light() -> None:
    """``import cbscope`` and ``import cbscope.organism`` load no torch (the CLI starts fast)."""
    import subprocess
    import sys

    code = ("import sys, cbscope, cbscope.organism, cbscope.organism.world; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'streamlit')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout[:300]
