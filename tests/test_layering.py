"""The package's layering, checked by walking its imports (module-level AND inside functions).

    core            the language: imports nothing of mp_executors above it
    executors       never import factories, contexts or workers' pool
    factories       the only place stacks are composed; never import contexts
    context         installs into core.context_stack
    mp_executors/__init__.py sits above everything (it wires the default context)

An import inside a function is still an edge: hiding a cycle in a function body
does not make it go away, so the graph below includes them and must be acyclic.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mp_executors"


def _module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path], root: pathlib.Path = PACKAGE.parent) -> set[str]:
    """The mp_executors modules `path` imports, wherever in the file the import is."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            # `from pkg import module` names a module; `from module import name` names the module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("mp_executors"):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # The package's __init__ is the top: it may import anything, and every
    # submodule implicitly "imports" its parent packages, which is not a layer edge.
    graph["mp_executors"] = set()
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, black) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt) == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_even_through_function_level_imports():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("mp_executors.core", ("mp_executors.executors", "mp_executors.factories", "mp_executors.workers",
                               "mp_executors.context", "mp_executors.simulation", "mp_executors.cli",
                               "mp_executors.tff")),
        ("mp_executors.executors", ("mp_executors.factories", "mp_executors.context", "mp_executors.simulation",
                                    "mp_executors.cli", "mp_executors.tff")),
        ("mp_executors.factories", ("mp_executors.context", "mp_executors.simulation", "mp_executors.cli",
                                    "mp_executors.tff")),
        ("mp_executors.workers", ("mp_executors.factories", "mp_executors.context", "mp_executors.simulation",
                                  "mp_executors.cli")),
    ],
)
def test_layers_import_only_downwards(layer, forbidden):
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    # The walker itself: a function-level import is an edge, and a cycle through it is found.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    core = tmp_path / "mp_executors" / "core"
    core.mkdir(parents=True)
    (core / "a.py").write_text("import numpy\n\ndef f():\n    from mp_executors.core import b\n    from . import c\n")
    (core / "b.py").write_text("")
    (core / "c.py").write_text("")
    modules = {f"mp_executors.core.{m}": core / f"{m}.py" for m in "abc"}
    assert _imports(core / "a.py", modules, root=tmp_path) == {"mp_executors.core.b", "mp_executors.core.c"}
