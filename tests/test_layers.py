"""The house rules that keep the package readable: method knowledge stays in `adapters/`, functions stay short."""

import ast
from pathlib import Path

import pytest

from lightning_peft.adapters import ADAPTERS

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_peft"
OUTSIDE_ADAPTERS = sorted(
    p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("adapters", "tasks")
)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("path", OUTSIDE_ADAPTERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_adapters_names_a_concrete_method(path):
    """A new method is one file: export, import, suggest, report and the rest ask the method, never its name."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    named = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in ADAPTERS and id(node) not in docs
    ]
    assert not named, f"{path.relative_to(PACKAGE)} names methods in code at (line, name): {named}"


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


def test_no_import_cycles_counting_imports_inside_functions():
    """Layers are checked by `lint-imports`; this also catches a cycle between two modules of one layer.

    Package `__init__` files only re-export, so they are left out (importing a name through a package's
    `__init__` is not a dependency on its siblings).
    """
    import grimp

    graph = grimp.build_graph("lightning_peft")
    packages = {m for m in graph.modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").is_file()}
    modules = sorted(graph.modules - packages)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module) - packages:
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None and all(m not in packages for m in back):
                cycles.append((module, *back))
    assert not cycles, cycles
