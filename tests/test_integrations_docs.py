"""The plain-loop example in docs/integrations.md runs and freezes what it says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from finetune import FreezeAllBut, GradualUnfreeze
from tests.conftest import make_tiny_backbone

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def plain_loop() -> Any:
    """`train_plain` as defined by the doc's tested code block."""
    text = DOC.read_text()
    block = re.search(r"<!-- tested: [^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/integrations.md lost its tested plain-loop block"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)
    return namespace["train_plain"]


def test_the_documented_plain_loop_keeps_frozen_layers_and_statistics_unchanged(
        random_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    backbone = make_tiny_backbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    plain_loop()(backbone, FreezeAllBut(groups=("block2",)), random_batches, epochs=2, lr=1e-2)
    after = backbone.model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        trains = key.startswith(("block2.", "fc."))
        assert changed == trains, key


def test_the_documented_plain_loop_follows_a_scheduled_strategy(
        random_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    backbone = make_tiny_backbone()
    stem = backbone.model.stem[0].weight.clone()
    block1 = backbone.model.block1[0].weight.clone()
    plain_loop()(backbone, GradualUnfreeze(every=1), random_batches, epochs=3, lr=1e-2)
    assert torch.equal(backbone.model.stem[0].weight, stem)  # unfreezes at epoch 3: never
    assert not torch.equal(backbone.model.block1[0].weight, block1)  # from epoch 2


def test_the_documented_recipes_loop_averages_what_trains_and_leaves_the_rest(
        random_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    text = DOC.read_text()
    block = re.search(r"<!-- tested-recipes: [^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/integrations.md lost its tested recipes block"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)
    backbone = make_tiny_backbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    torch.manual_seed(0)
    namespace["train_with_recipes"](backbone, FreezeAllBut(["block2"]), random_batches, 2)
    after = backbone.model.state_dict()
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        trains = name.startswith(("block2.", "fc."))
        assert moved == trains, name
