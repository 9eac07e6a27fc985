"""The FreezeStrategy contract and the four reference strategies."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import pytest
import torch

from finetune import (
    STRATEGIES,
    Backbone,
    FreezeFraction,
    FreezeHeadOnly,
    FreezeStrategy,
    FullUnfreeze,
    LastLayerOnly,
    build_strategy,
)
from tests.conftest import make_tiny_backbone

TINY_PARAMS = [
    "stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias",
    "block1.0.weight", "block1.0.bias", "block1.1.weight", "block1.1.bias",
    "block2.0.weight", "block2.0.bias", "block2.1.weight", "block2.1.bias",
    "fc.weight", "fc.bias",
]
EXPECTED_TRAINABLE = {
    "last-layer": (LastLayerOnly(), {"fc.weight", "fc.bias"}),
    "full-unfreeze": (FullUnfreeze(), set(TINY_PARAMS)),
    "freeze-head-only": (FreezeHeadOnly(), set(TINY_PARAMS) - {"fc.weight", "fc.bias"}),
    # 14 tensors: int(0.5 * 14) = 7 frozen, so block1's BN bias is the first that trains.
    "freeze-fraction": (FreezeFraction(0.5), set(TINY_PARAMS[7:])),
}


@attrs.frozen
class Block2AndHead(FreezeStrategy):
    """The docs' ten-line user strategy: surgical fine-tuning of the last block."""

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        return {name: 1.0 for name, _ in backbone.named_parameters_in("block2", "head")}


def test_registry_names_the_reference_strategies() -> None:
    for name, (strategy, _) in EXPECTED_TRAINABLE.items():
        assert STRATEGIES[name] is type(strategy)
        assert type(strategy).registry_name == name
    assert isinstance(build_strategy("freeze-fraction", fraction=0.3), FreezeFraction)
    with pytest.raises(KeyError, match=r"unknown strategy 'freeze-all'.*last-layer"):
        build_strategy("freeze-all")


@pytest.mark.parametrize("name", sorted(EXPECTED_TRAINABLE))
def test_apply_trains_exactly_the_intended_tensors(name: str) -> None:
    strategy, expected = EXPECTED_TRAINABLE[name]
    backbone = make_tiny_backbone()
    report = strategy.apply(backbone)
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert report.trainable_tensors == len(expected)
    assert report.trainable_params == sum(
        p.numel() for n, p in backbone.model.named_parameters() if n in expected
    )


@pytest.mark.parametrize(
    "strategy",
    [s for s, _ in EXPECTED_TRAINABLE.values()] + [Block2AndHead(), LastLayerOnly(train_bn=True)],
    ids=lambda s: s.describe(),
)
def test_training_moves_only_what_the_strategy_trains(
    strategy: FreezeStrategy, random_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Snapshot, train a few Adam steps with weight decay, compare: frozen weights and the
    buffers of frozen BatchNorm layers must be bit-identical, trainable weights must move."""
    backbone = make_tiny_backbone()
    strategy.apply(backbone)
    optimizer = torch.optim.AdamW(strategy.param_groups(backbone, lr=1e-2), weight_decay=0.1)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    backbone.train()
    for images, labels in random_batches:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(backbone(images), labels).backward()
        optimizer.step()
    after = backbone.model.state_dict()
    for name, parameter in backbone.model.named_parameters():
        moved = not torch.equal(before[name], after[name])
        assert moved == parameter.requires_grad, name
    for layer in ("stem.1", "block1.1", "block2.1"):
        frozen = layer in backbone.frozen_norm_layers
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{layer}.{buffer}"
            assert torch.equal(before[key], after[key]) == frozen, key


def test_frozen_batchnorm_survives_train_calls_and_train_bn_opts_out() -> None:
    backbone = make_tiny_backbone()
    LastLayerOnly().apply(backbone)
    backbone.eval()
    backbone.train()
    assert backbone.frozen_norm_layers == {"stem.1", "block1.1", "block2.1"}
    assert not any(m.training for m in backbone.model.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    LastLayerOnly(train_bn=True).apply(backbone)
    assert backbone.frozen_norm_layers == frozenset()
    assert all(m.training for m in backbone.model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert not backbone.model.stem[0].training  # frozen conv: inference mode (frozen_eval)


def test_a_batchnorm_with_one_trainable_parameter_keeps_training() -> None:
    backbone = make_tiny_backbone()
    FreezeFraction(0.5).apply(backbone)  # block1.1.weight frozen, block1.1.bias trains
    assert "block1.1" not in backbone.frozen_norm_layers
    assert backbone.frozen_norm_layers == {"stem.1"}


def test_param_groups_hold_only_trainable_parameters_with_multipliers() -> None:
    @attrs.frozen
    class HalfSpeedStem(FreezeStrategy):
        def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
            plan = {n: 1.0 for n, _ in backbone.named_parameters_in("block2", "head")}
            plan.update({n: 0.5 for n, _ in backbone.named_parameters_in("stem")})
            return plan

    backbone = make_tiny_backbone()
    strategy = HalfSpeedStem()
    strategy.apply(backbone)
    groups = strategy.param_groups(backbone, lr=0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("stem", 0.05), ("block2", 0.1), ("head", 0.1)
    ]
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert in_groups == trainable


def test_user_subclass_on_resnet50() -> None:
    @attrs.frozen
    class Layer4AndHead(FreezeStrategy):
        def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
            return {n: 1.0 for n, _ in backbone.named_parameters_in("layer4", "head")}

    backbone = Backbone.resnet50(num_classes=10, weights=None)
    report = Layer4AndHead().apply(backbone)
    assert report.trainable_groups == ("layer4", "head")
    assert report.trainable_tensors == 32


def test_resnet50_reference_facts() -> None:
    backbone = Backbone.resnet50(num_classes=10, weights=None)
    report = FreezeFraction(0.8).apply(backbone)
    assert (report.trainable_tensors, report.total_tensors) == (33, 161)
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert names[0] == "layer3.5.bn3.bias"
    LastLayerOnly().apply(backbone)
    assert [n for n, p in backbone.model.named_parameters() if p.requires_grad] == [
        "fc.weight", "fc.bias"
    ]
    numel = FreezeFraction(0.8, count="numel").apply(backbone)
    assert numel.trainable_tensors == 14
    sizes = [p.numel() for p in backbone.model.parameters()]
    frozen = numel.total_params - numel.trainable_params
    assert frozen == sum(sizes[:147]) <= 0.8 * numel.total_params < frozen + sizes[147]
    groups = FreezeFraction(0.8, count="groups").apply(backbone)
    assert groups.trainable_groups == ("layer4", "head")


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "0.8"])
def test_fraction_outside_unit_interval_is_refused(fraction: object) -> None:
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        FreezeFraction(fraction)  # type: ignore[arg-type]


def test_fraction_edges_freeze_nothing_or_everything() -> None:
    backbone = make_tiny_backbone()
    assert FreezeFraction(0.0).apply(backbone).trainable_tensors == len(TINY_PARAMS)
    assert FreezeFraction(1.0).apply(backbone).trainable_tensors == 0


def test_unknown_count_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'count' must be in"):
        FreezeFraction(0.8, count="layers")


def test_strategy_naming_unknown_parameters_is_refused() -> None:
    @attrs.frozen
    class Typo(FreezeStrategy):
        def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
            return {"fc.weigth": 1.0}

    with pytest.raises(KeyError, match=r"lacks: \['fc.weigth'\]"):
        Typo().apply(make_tiny_backbone())


def test_unknown_group_names_are_refused() -> None:
    with pytest.raises(KeyError, match=r"no group\(s\) \['layer4'\].*stem"):
        list(make_tiny_backbone().named_parameters_in("layer4"))


def test_non_positive_multiplier_is_refused() -> None:
    @attrs.frozen
    class Zero(FreezeStrategy):
        def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
            return {"fc.weight": 0.0}

    with pytest.raises(ValueError, match="non-positive lr multipliers"):
        Zero().apply(make_tiny_backbone())


def test_state_dict_is_plain_data() -> None:
    state = FreezeFraction(0.7, count="groups").state_dict()
    assert state == {
        "class": "FreezeFraction",
        "options": {"train_bn": False, "frozen_eval": True, "fraction": 0.7, "count": "groups"},
    }


def test_parse_strategy_reads_the_command_line_spelling() -> None:
    from finetune import FreezeAllBut, GradualUnfreeze, parse_strategy

    assert parse_strategy("last-layer") == LastLayerOnly()
    assert parse_strategy("freeze-fraction:fraction=0.5:count=numel") == FreezeFraction(
        0.5, count="numel")
    assert parse_strategy("freeze-fraction:fraction=0.5,train-bn=true") == FreezeFraction(
        0.5, train_bn=True)
    assert parse_strategy("freeze-all-but:groups=layer4").groups == ("layer4",)
    assert parse_strategy("freeze-all-but:groups=layer3+layer4") == FreezeAllBut(
        groups=("layer3", "layer4"))
    assert parse_strategy("gradual-unfreeze:at=2+4:depth=none") == GradualUnfreeze(at=(2, 4))
    with pytest.raises(ValueError, match=r"unknown strategy 'freez'; registered: bitfit"):
        parse_strategy("freez")
    with pytest.raises(ValueError,
                       match=r"bad option 'depth' .* key from train_bn, frozen_eval, every"):
        parse_strategy("gradual-unfreeze:depth")
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        parse_strategy("freeze-fraction:fraction=2")
