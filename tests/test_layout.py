"""The layers of docs/architecture.md hold: every import points down, and no modules import
each other in a circle. Size follows cohesion, not a line count: one readable long module beats
several short ones that call each other back, so no length is enforced."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
# The layers of docs/architecture.md, bottom first: a package may import only from layers
# below its own (and `finetune.errors` / `finetune.atomic`, which everything may use).
LAYERS = (
    ("finetune.data",),
    ("finetune.runtime", "finetune.stats"),
    ("finetune.model",),
    ("finetune.strategies",),
    ("finetune.cache",),
    ("finetune.train",),
    ("finetune.callbacks",),
    ("finetune.tuning",),
    ("finetune.deploy",),
    ("finetune.compare",),
    ("finetune.cli", "finetune.functional", "finetune.integrations"),
)
FORBIDDEN = {
    package: tuple(p for higher in LAYERS[level + 1:] for p in higher)
    + tuple(p for p in LAYERS[level] if p != package)
    for level, packages in enumerate(LAYERS) for package in packages
}


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(p for p in parts if p != "__init__"), path))
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(("name", "path"), modules(), ids=[n for n, _ in modules()])
def test_imports_point_down(name: str, path: Path) -> None:
    layer = next((layer for layer in FORBIDDEN if name == layer or name.startswith(layer + ".")),
                 None)
    if layer is not None:
        upward = sorted(i for i in imported(path)
                        if any(i == f or i.startswith(f + ".") for f in FORBIDDEN[layer]))
        assert not upward, f"{name} ({layer} layer) imports {upward} from a layer above it"


def load_time_imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports when it is loaded: module-level imports, not those
    inside functions (deferred on purpose) or under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", [])
                      + [s for handler in getattr(node, "handlers", []) for s in handler.body])
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
                found.add(node.module)

    visit(ast.parse(path.read_text()).body)
    return {name for name in found if name in known}


def test_no_modules_import_each_other_in_a_circle() -> None:
    names = dict(modules())
    graph = {name: load_time_imports(path, set(names)) - {name} for name, path in names.items()}
    # a package's __init__ imports its modules, so a module that imports its own package
    # (`from finetune.data import defaults` inside finetune/data/) closes a circle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for child in sorted(graph[name]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (circle := visit(child)):
                return circle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name)):
            raise AssertionError("import circle: " + " -> ".join(circle))


MAX_MODULES = 14  # a folder past a dozen modules is a flat folder: split it by concept


def test_no_folder_holds_more_than_a_dozen_modules() -> None:
    folders = {path.parent for _, path in modules()}
    crowded = {str(folder.relative_to(PACKAGE.parent)): count for folder in folders
               if (count := len(list(folder.glob("*.py")))) > MAX_MODULES}
    assert not crowded, f"folders of more than {MAX_MODULES} modules: {crowded}"
