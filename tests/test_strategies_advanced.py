"""Gradual unfreezing, discriminative lrs, LP-FT, BitFit, FreezeAllBut (LoRA: test_lora.py)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.callbacks import Checkpoint
from finetune.model.backbone import Backbone
from finetune.strategies import (
    STRATEGIES,
    BitFit,
    DiscriminativeLR,
    FreezeAllBut,
    FreezeStrategy,
    GradualUnfreeze,
    LinearProbeThenFinetune,
    build_strategy,
)
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer
from tests.conftest import make_tiny_backbone

TINY = {
    "stem": ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"],
    "block1": ["block1.0.weight", "block1.0.bias", "block1.1.weight", "block1.1.bias"],
    "block2": ["block2.0.weight", "block2.0.bias", "block2.1.weight", "block2.1.bias"],
    "head": ["fc.weight", "fc.bias"],
}


def names_of(*groups: str) -> set[str]:
    return {name for group in groups for name in TINY[group]}


# (strategy, epoch, parameters expected to train at that epoch) — written out by hand.
CASES: list[tuple[str, FreezeStrategy, int, set[str]]] = [
    ("gradual-unfreeze", GradualUnfreeze(every=2), 0, names_of("head")),
    ("gradual-unfreeze", GradualUnfreeze(every=2), 2, names_of("block2", "head")),
    ("gradual-unfreeze", GradualUnfreeze(at=(1, 2, 3), warmup_epochs=1), 3,
     names_of("stem", "block1", "block2", "head")),
    ("lp-ft", LinearProbeThenFinetune(probe_epochs=2), 1, names_of("head")),
    ("lp-ft", LinearProbeThenFinetune(probe_epochs=2), 2, set().union(*TINY.values())),
    ("discriminative-lr", DiscriminativeLR(decay=0.5, frozen=("stem",)), 0,
     names_of("block1", "block2", "head")),
    ("bitfit", BitFit(), 0,
     {n for n in set().union(*TINY.values()) if n.endswith(".bias") or ".1." in n} | {"fc.weight"}),
    ("freeze-all-but", FreezeAllBut(groups=("block1",)), 0, names_of("block1", "head")),
    ("freeze-all-but", FreezeAllBut(groups=("stem",), train_head=False), 0, names_of("stem")),
]


def train_steps(
    backbone: Backbone,
    strategy: FreezeStrategy,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    epoch: int = 0,
) -> torch.optim.Optimizer:
    """A few Adam steps through the strategy's own parameter groups, as the Trainer will."""
    backbone.train()
    optimizer = torch.optim.Adam(strategy.param_groups(backbone, 1e-2, epoch))
    for images, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(backbone(images), labels).backward()
        optimizer.step()
    return optimizer


def snapshot(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def assert_contract(
    backbone: Backbone,
    strategy: FreezeStrategy,
    epoch: int,
    expected: set[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Exactly `expected` trains; after steps, frozen weights and frozen BN buffers are
    bit-identical and trainable weights moved."""
    report = strategy.apply(backbone, epoch)
    trains = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trains == expected
    assert report.trainable_tensors == len(expected)
    grouped = {id(p) for g in strategy.param_groups(backbone, 1e-2, epoch) for p in g["params"]}
    assert grouped == {id(p) for n, p in backbone.model.named_parameters() if n in expected}

    norms = {n: m for n, m in backbone.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    frozen_norms = {
        n for n, m in norms.items() if not any(p.requires_grad for p in m.parameters())
    }
    assert backbone.frozen_norm_layers == frozen_norms

    before = snapshot(backbone)
    train_steps(backbone, strategy, batches, epoch)
    after = snapshot(backbone)
    for name in (n for n, _ in backbone.model.named_parameters()):
        if name in expected:
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    for norm in norms:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{norm}.{buffer}"
            moved = not torch.equal(before[key], after[key])
            assert moved == (norm not in frozen_norms), f"{key} moved={moved}"


@pytest.mark.parametrize(
    ("name", "strategy", "epoch", "expected"), CASES, ids=[f"{c[0]}@{c[2]}" for c in CASES]
)
def test_contract(
    name: str,
    strategy: FreezeStrategy,
    epoch: int,
    expected: set[str],
    random_batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    assert STRATEGIES[name] is type(strategy)
    assert_contract(make_tiny_backbone(), strategy, epoch, expected, random_batches)


def test_every_new_strategy_has_a_contract_case() -> None:
    covered = {c[0] for c in CASES} | {"lora"}  # LoRA's contract test lives in test_lora.py
    new = {"gradual-unfreeze", "lp-ft", "discriminative-lr", "bitfit", "freeze-all-but", "lora"}
    assert new <= set(STRATEGIES)
    assert new <= covered


@pytest.mark.parametrize("strategy", [c[1] for c in CASES] + [GradualUnfreeze(at=[2, 5])])
def test_state_dict_rebuilds_the_strategy(strategy: FreezeStrategy) -> None:
    state = strategy.state_dict()
    assert build_strategy(strategy.registry_name, **state["options"]) == strategy


# -- GradualUnfreeze ----------------------------------------------------------------------------
def groups_training(strategy: FreezeStrategy, epoch: int) -> tuple[str, ...]:
    return strategy.apply(make_tiny_backbone(), epoch).trainable_groups


def test_gradual_unfreeze_every_k_epochs_top_down() -> None:
    strategy = GradualUnfreeze(every=2)
    assert [groups_training(strategy, e) for e in range(8)] == [
        ("head",), ("head",),
        ("block2", "head"), ("block2", "head"),
        ("block1", "block2", "head"), ("block1", "block2", "head"),
        ("stem", "block1", "block2", "head"), ("stem", "block1", "block2", "head"),
    ]


def test_gradual_unfreeze_at_given_epochs_and_depth() -> None:
    at = GradualUnfreeze(at=(1, 4, 5))
    assert [len(groups_training(at, e)) for e in range(7)] == [1, 2, 2, 2, 3, 4, 4]
    shallow = GradualUnfreeze(every=1, depth=2)
    assert groups_training(shallow, 9) == ("block1", "block2", "head")


def test_gradual_unfreeze_changes_at_exactly_the_schedule() -> None:
    def points(strategy: GradualUnfreeze) -> list[int]:
        return [e for e in range(12) if strategy.changes_at(e)]

    assert points(GradualUnfreeze(at=(1, 4, 5))) == [1, 4, 5]
    assert points(GradualUnfreeze(every=2, depth=3)) == [2, 4, 6]
    assert points(GradualUnfreeze(at=(2, 6), warmup_epochs=2)) == [2, 3, 4, 6, 7, 8]
    assert points(GradualUnfreeze(every=3)) == [3, 6, 9]  # open-ended: all multiples
    assert points(GradualUnfreeze(every=3, warmup_epochs=1)) == [3, 4, 6, 7, 9, 10]


def test_gradual_unfreeze_changes_at_matches_actual_changes() -> None:
    """changes_at(e) is true iff the plan at e differs from the plan at e - 1."""
    backbone = make_tiny_backbone()
    for strategy in (GradualUnfreeze(every=2, depth=3, warmup_epochs=1),
                     GradualUnfreeze(at=(1, 2, 6), warmup_epochs=2, lr_multiplier=0.3)):
        plans = [dict(strategy.trainable(backbone, e)) for e in range(12)]
        for e in range(1, 12):
            assert strategy.changes_at(e) == (plans[e] != plans[e - 1]), (strategy, e)


def test_gradual_unfreeze_warmup_multipliers() -> None:
    strategy = GradualUnfreeze(at=(1, 3), lr_multiplier=0.3, warmup_epochs=2)
    backbone = make_tiny_backbone()

    def multipliers(epoch: int) -> dict[str, float]:
        groups = strategy.param_groups(backbone, 0.1, epoch)
        for group in groups:
            assert group["lr"] == pytest.approx(0.1 * group["lr_multiplier"])
        return {g["name"]: g["lr_multiplier"] for g in groups}

    assert multipliers(0) == {"head": 1.0}
    assert multipliers(1) == pytest.approx({"block2": 0.1, "head": 1.0})
    assert multipliers(2) == pytest.approx({"block2": 0.2, "head": 1.0})
    assert multipliers(3) == pytest.approx({"block1": 0.1, "block2": 0.3, "head": 1.0})
    assert multipliers(5) == pytest.approx({"block1": 0.3, "block2": 0.3, "head": 1.0})


def group_layout(strategy: FreezeStrategy, backbone: Backbone, epoch: int) -> list[tuple]:
    return [
        (g["name"], g["lr_multiplier"], len(g["params"]))
        for g in strategy.param_groups(backbone, 0.01, epoch)
    ]


@pytest.mark.parametrize("resume_epoch", range(7))
def test_gradual_unfreeze_resume_mid_schedule_restores_what_was_frozen(
    resume_epoch: int, random_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """A run through epochs 0..e and a fresh backbone + strategy applied at e agree on what
    trains, the BN policy and the optimizer's parameter groups — so the saved optimizer state
    loads (the param-group-count failure of add_param_group bookkeeping)."""
    strategy = GradualUnfreeze(every=2, warmup_epochs=1, lr_multiplier=0.5)
    ran = make_tiny_backbone()
    strategy.apply(ran, 0)
    optimizer = train_steps(ran, strategy, random_batches[:1], 0)
    for epoch in range(1, resume_epoch + 1):
        if strategy.changes_at(epoch):
            strategy.apply(ran, epoch)
            optimizer = train_steps(ran, strategy, random_batches[:1], epoch)

    rebuilt = build_strategy("gradual-unfreeze", **strategy.state_dict()["options"])
    fresh = make_tiny_backbone(seed=1)
    fresh.load_state_dict(ran.state_dict())
    rebuilt.apply(fresh, resume_epoch)

    def requires_grad(b: Backbone) -> dict[str, bool]:
        return {n: p.requires_grad for n, p in b.model.named_parameters()}

    assert requires_grad(fresh) == requires_grad(ran)
    assert fresh.frozen_norm_layers == ran.frozen_norm_layers
    assert group_layout(rebuilt, fresh, resume_epoch) == group_layout(strategy, ran, resume_epoch)
    resumed = torch.optim.Adam(rebuilt.param_groups(fresh, 1e-2, resume_epoch))
    resumed.load_state_dict(optimizer.state_dict())  # raises on a group-count mismatch
    assert len(resumed.state) == sum(len(g["params"]) for g in resumed.param_groups)


def test_gradual_unfreeze_validates_schedule() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        GradualUnfreeze(at=(3, 2))
    with pytest.raises(ValueError, match="epoch 0 always"):
        GradualUnfreeze(at=(0, 2))
    with pytest.raises(ValueError, match="every"):
        GradualUnfreeze(every=0)


# -- LP-FT --------------------------------------------------------------------------------------
def test_lp_ft_probes_then_finetunes_everything_at_lower_lr() -> None:
    strategy = LinearProbeThenFinetune(probe_epochs=3, finetune_lr_multiplier=0.1)
    backbone = make_tiny_backbone()
    assert [strategy.changes_at(e) for e in range(6)] == [False] * 3 + [True, False, False]
    for epoch in range(3):
        assert set(strategy.trainable(backbone, epoch).values()) == {1.0}
        assert groups_training(strategy, epoch) == ("head",)
    layout = group_layout(strategy, backbone, 3)
    assert [g[0] for g in layout] == backbone.group_names
    assert {g[1] for g in layout} == {0.1}


# -- DiscriminativeLR ---------------------------------------------------------------------------
def test_discriminative_lr_decays_geometrically_head_to_stem() -> None:
    backbone = make_tiny_backbone()
    layout = group_layout(DiscriminativeLR(decay=0.5), backbone, 0)
    assert layout == [("stem", 0.125, 4), ("block1", 0.25, 4), ("block2", 0.5, 4), ("head", 1.0, 2)]
    lrs = {g["name"]: g["lr"] for g in DiscriminativeLR(decay=0.8).param_groups(backbone, 1.0)}
    assert lrs == pytest.approx({"stem": 0.8**3, "block1": 0.8**2, "block2": 0.8, "head": 1.0})


def test_discriminative_lr_composes_with_a_frozen_prefix() -> None:
    backbone = make_tiny_backbone()
    strategy = DiscriminativeLR(decay=0.5, frozen=("stem", "block1"))
    assert group_layout(strategy, backbone, 0) == [("block2", 0.5, 4), ("head", 1.0, 2)]
    strategy.apply(backbone)
    assert backbone.frozen_norm_layers == {"stem.1", "block1.1"}


def test_discriminative_lr_rejects_bad_decay_and_groups() -> None:
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        DiscriminativeLR(decay=1.5)
    with pytest.raises(ValueError, match="valid groups are"):
        DiscriminativeLR(frozen=("layer9",)).apply(make_tiny_backbone())


# -- BitFit -------------------------------------------------------------------------------------
def test_bitfit_trains_exactly_biases_norm_affine_and_head() -> None:
    backbone = make_tiny_backbone()
    BitFit().apply(backbone)
    trains = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trains == {
        "stem.0.bias", "stem.1.weight", "stem.1.bias",
        "block1.0.bias", "block1.1.weight", "block1.1.bias",
        "block2.0.bias", "block2.1.weight", "block2.1.bias",
        "fc.weight", "fc.bias",
    }
    assert backbone.frozen_norm_layers == frozenset()


def test_bitfit_on_resnet18_leaves_conv_weights_frozen() -> None:
    backbone = Backbone.from_torchvision("resnet18", num_classes=4, weights=None)
    report = BitFit().apply(backbone)
    norms = [m for m in backbone.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert report.trainable_tensors == 2 * len(norms) + 2
    assert report.trainable_params == sum(2 * m.num_features for m in norms) + 512 * 4 + 4
    assert all(not p.requires_grad for n, p in backbone.model.named_parameters() if "conv" in n)


# -- FreezeAllBut -------------------------------------------------------------------------------
def test_freeze_all_but_unknown_group_lists_valid_groups() -> None:
    strategy = FreezeAllBut(groups=("block1", "layer4"))
    with pytest.raises(
        ValueError,
        match=r"no group\(s\) \['layer4'\]; "
        r"valid groups are \['stem', 'block1', 'block2', 'head'\]",
    ):
        strategy.apply(make_tiny_backbone())
    with pytest.raises(ValueError, match="at least one group"):
        FreezeAllBut(groups=())


def test_freeze_all_but_accepts_a_single_name_and_several_groups() -> None:
    assert FreezeAllBut(groups="stem").groups == ("stem",)
    strategy = FreezeAllBut(groups=["stem", "block2"])
    assert groups_training(strategy, 0) == ("stem", "block2", "head")


# -- end to end through the Trainer ------------------------------------------------------------
def test_gradual_unfreeze_resume_through_trainer_matches_a_straight_run(tmp_path: Path) -> None:
    """5 epochs straight == 3 epochs, checkpoint, fresh objects, resume for 2 more — resuming in
    the middle of the schedule (two groups unfrozen, one of them still warming up)."""
    strategy = GradualUnfreeze(every=1, depth=3, warmup_epochs=1, lr_multiplier=0.5)
    config = TrainConfig(epochs=5, lr=1e-2, seed=0, precision="fp32", device="cpu")

    def loader() -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (32,), generator=generator)
        images = torch.randn(32, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1)
        return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True,
                          generator=torch.Generator().manual_seed(1))

    straight = make_tiny_backbone()
    Trainer(straight, strategy, config).fit(loader())

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    first = make_tiny_backbone()
    Trainer(first, strategy, attrs.evolve(config, epochs=3), callbacks=[checkpoint]).fit(loader())
    resumed = make_tiny_backbone(seed=5)
    trainer = Trainer(resumed, GradualUnfreeze(**strategy.state_dict()["options"]), config)
    trainer.fit(loader(), resume=checkpoint.last_path)

    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert trainer.state.freeze_report.trainable_groups == ("stem", "block1", "block2", "head")
