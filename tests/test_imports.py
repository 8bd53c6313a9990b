"""The package's modules import each other in one direction: no cycles, and no lower room imports a higher one."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lego_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that ``path`` imports, at its top or inside a function (a lazy import is
    still a dependency). ``from package import name`` is the submodule ``package.name`` where there is one."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 50 and graph["lego_lightning.decoding.engine"]  # the graph was read, edges and all
    assert cycles(graph) == []


def test_cycles_are_found_where_there_are_some():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("room", "above"),
    [
        ("lego_lightning.model", ("lego_lightning.decoding", "lego_lightning.modules", "lego_lightning.callbacks",
                                  "lego_lightning.data", "lego_lightning.cli", "lego_lightning.generation")),
        ("lego_lightning.decoding", ("lego_lightning.modules", "lego_lightning.callbacks", "lego_lightning.data",
                                     "lego_lightning.cli", "lego_lightning.generation")),
    ],
)  # fmt: skip
def test_a_lower_room_never_imports_a_higher_one_nor_lightning(room, above):
    for path in sorted((REPO / room.replace(".", "/")).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        named |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not [m for m in named if m.startswith(above)], path
        assert not [m for m in named if m.split(".")[0] in ("lightning", "pytorch_lightning")], path
