"""The layers of docs/architecture.md hold: every import points down, and each module can be
read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
# A layer may not import these (front ends and observers sit above core; data is the bottom).
FORBIDDEN = {
    "finetune.data": ("finetune.core", "finetune.callbacks", "finetune.cli",
                      "finetune.functional", "finetune.integrations"),
    "finetune.core": ("finetune.callbacks", "finetune.cli", "finetune.functional",
                      "finetune.integrations"),
    "finetune.callbacks": ("finetune.cli", "finetune.functional", "finetune.integrations"),
}
MAX_LINES = 400


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
def test_imports_point_down_and_modules_stay_short(name: str, path: Path) -> None:
    layer = next((layer for layer in FORBIDDEN if name == layer or name.startswith(layer + ".")),
                 None)
    if layer is not None:
        upward = sorted(i for i in imported(path)
                        if any(i == f or i.startswith(f + ".") for f in FORBIDDEN[layer]))
        assert not upward, f"{name} ({layer} layer) imports {upward} from a layer above it"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (see architecture.md)"
