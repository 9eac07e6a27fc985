"""`finetune advise`: the multi-cut cache (one pass, bit-identical to single cuts), the
advisor's choice on synthetic backbones where shallow features suffice and where the last
block must change, measured costs, advise.json, and the command line."""

from __future__ import annotations

import copy
import json

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, parse_strategy
from finetune.cache import plan
from finetune.cache.plan import ActivationCaches, plan_cut
from finetune.strategies import LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer
from finetune.tuning.advisor import Advisor, depth_strategies, linear_probe, paired_standard_error
from tests.conftest import FAST, TINY, make_loader, make_tiny_backbone, make_tree, run_cli

CONFIG = TrainConfig(epochs=4, lr=3e-2, seed=0, precision="fp32", channels_last=False,
                     device="cpu", keep_freed_memory=False)
WIDTH, INFORMATIVE, NOISE = 768, 3, 5  # inputs: 3 coordinates decide the class, 5 are noise


class Synthetic(nn.Module):
    """A "pretrained" network on vectors: the stem copies its input as (x, -x) through a
    ReLU, block1 passes that on; block2 passes on only what `block2_keeps` marks — all of it
    (shallow features suffice) or the noise alone (the last block must change)."""

    def __init__(self, block2_keeps: torch.Tensor) -> None:
        super().__init__()
        inputs = INFORMATIVE + NOISE
        self.stem = nn.Sequential(nn.Linear(inputs, WIDTH), nn.ReLU())
        self.block1 = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.fc = nn.Linear(WIDTH, 1000)
        with torch.no_grad():
            stem = torch.zeros(WIDTH, inputs)
            stem[:inputs] = torch.eye(inputs)
            stem[inputs:2 * inputs] = -torch.eye(inputs)
            self.stem[0].weight.copy_(stem)
            self.block1[0].weight.copy_(torch.eye(WIDTH))
            self.block2[0].weight.copy_(torch.diag(block2_keeps.float()))
            for block in (self.stem, self.block1, self.block2):
                block[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))))


def synthetic_backbone(last_block_hides_the_class: bool) -> Backbone:
    torch.manual_seed(0)
    inputs = INFORMATIVE + NOISE
    keeps = torch.ones(WIDTH)
    if last_block_hides_the_class:
        keeps[:INFORMATIVE] = 0
        keeps[inputs:inputs + INFORMATIVE] = 0
    return Backbone.from_module(
        Synthetic(keeps), head="fc", num_classes=INFORMATIVE, name="synthetic",
        groups=(("stem", r"^stem\."), ("block1", r"^block1\."), ("block2", r"^block2\.")))


def vectors(n: int, seed: int) -> DataLoader:
    """The class is the largest of the informative coordinates: linear in the input."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INFORMATIVE + NOISE, generator=generator)
    y = x[:, :INFORMATIVE].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + 1))


def advisor(**options) -> Advisor:
    return Advisor(CONFIG, **{"budget": 60.0, "timed_steps": 3, **options})


# -- the multi-cut cache -----------------------------------------------------------------------
def test_one_pass_keeps_every_depth_bit_identical_to_its_own_cut(monkeypatch) -> None:
    fills = []
    original = plan.fill_together
    monkeypatch.setattr(plan, "fill_together", lambda caches, prefix, loader, *a, **k: (
        fills.append(len(caches)), original(caches, prefix, loader, *a, **k))[1])
    initial = make_tiny_backbone(seed=3)
    depths = depth_strategies(initial)
    assert [name for name, _, _ in depths] == ["none", "stem", "block1", "block2"]
    points = {}
    for name, strategy, _ in depths[1:]:
        strategy.apply(initial)
        points[name] = plan_cut(initial)[0].point
    train, val = make_loader(24, seed=1, shuffle=True), make_loader(16, seed=2, shuffle=False)
    shared = ActivationCaches(keep=list(points.values()))
    config = attrs.evolve(CONFIG, epochs=1)
    Trainer(copy.deepcopy(initial), LastLayerOnly(), config, activations=shared).fit(train, val)
    assert fills == [3, 3]  # train and val: one pass each, three depths each
    for name, strategy, _ in depths[1:]:
        alone = ActivationCaches()  # this depth's own cut, filled by its own fit
        Trainer(copy.deepcopy(initial), copy.deepcopy(strategy), config,
                activations=alone).fit(train, val)
        for loader in (train, val):
            together, _ = shared.stored(points[name], loader)
            single, _ = alone.stored(points[name], loader)
            assert torch.equal(together, single), name
    fills.clear()  # a depth sharing the pass's cache trains on it: no second pass
    Trainer(copy.deepcopy(initial), copy.deepcopy(depths[2][1]), config,
            activations=shared).fit(train, val)
    assert fills == []


def test_another_backbone_never_reads_the_kept_activations() -> None:
    initial = make_tiny_backbone(seed=3)
    _, strategy, _ = depth_strategies(initial)[2]
    strategy.apply(initial)
    point = plan_cut(initial)[0].point
    train = make_loader(16, seed=1, shuffle=False)
    shared = ActivationCaches(keep=[point])
    config = attrs.evolve(CONFIG, epochs=1)
    Trainer(copy.deepcopy(initial), LastLayerOnly(), config, activations=shared).fit(train)
    kept, _ = shared.stored(point, train)
    kept = kept.clone()
    other = make_tiny_backbone(seed=4)  # same architecture, other weights
    Trainer(other, copy.deepcopy(strategy), config, activations=shared).fit(train)
    refilled, _ = shared.stored(point, train)
    assert not torch.equal(kept, refilled)


# -- the advice ----------------------------------------------------------------------------------
def test_shallow_features_suffice_so_the_head_alone_is_advised() -> None:
    advice = advisor().run(synthetic_backbone(False), vectors(512, 0), vectors(128, 10))
    by_name = {d.name: d for d in advice.depths}
    assert all(by_name[name].probe_val_accuracy >= 0.9 for name in ("stem", "block1", "block2"))
    assert advice.recommendation.strategy == "last-layer"
    assert advice.recommendation.depth == "block2"
    assert by_name["block2"].finetune_val_accuracy >= 0.9


def test_when_the_last_block_must_change_the_advice_trains_it() -> None:
    advice = advisor().run(synthetic_backbone(True), vectors(512, 0), vectors(128, 10))
    by_name = {d.name: d for d in advice.depths}
    # the probes see it: the class is in block1's features and gone after block2
    assert by_name["block1"].probe_val_accuracy >= 0.9
    assert by_name["block2"].probe_val_accuracy < 0.6
    assert by_name["block2"].finetune_val_accuracy < 0.6  # the head alone cannot recover it
    assert advice.recommendation.depth == "block1"  # freeze through block1: block2 trains
    assert advice.recommendation.strategy == "freeze-all-but:groups=block2"
    assert by_name["block1"].finetune_val_accuracy >= 0.9


def test_costs_grow_with_what_trains_and_advise_json_has_every_field(tmp_path) -> None:
    advice = advisor().run(synthetic_backbone(False), vectors(512, 0), vectors(128, 10))
    depths = advice.depths
    params = [d.trainable_params for d in depths]
    assert params == sorted(params, reverse=True)  # none trains most, the head alone least
    assert depths[0].seconds_per_epoch > 2 * depths[-1].seconds_per_epoch
    assert all(d.peak_memory_mb is not None for d in depths)
    written = advice.write(tmp_path / "advice")
    assert {p.name for p in written} >= {"advise.json", "advise.md"}
    record = json.loads((tmp_path / "advice" / "advise.json").read_text())
    fields = {"name", "trainable_params", "probe_val_accuracy", "probe_val_ci95",
              "seconds_per_epoch", "peak_memory_mb", "finetune_val_accuracy"}
    for depth in record["depths"]:
        assert fields <= set(depth)
        if depth["probe_val_ci95"] is not None:
            low, high = depth["probe_val_ci95"]
            assert low <= depth["probe_val_accuracy"] <= high
    assert record["depths"][0]["probe_val_accuracy"] is None  # nothing frozen: no probe
    recommendation = record["recommendation"]
    assert set(recommendation) >= {"strategy", "command", "reason"}
    parse_strategy(recommendation["strategy"])  # the spec `finetune train` takes
    assert f"--strategy {recommendation['strategy']}" in recommendation["command"]
    assert record["settings"]["machine"]["cpu"]


def test_the_budget_limits_the_fine_tunes_and_says_so() -> None:
    advice = advisor(budget=0.0).run(synthetic_backbone(False), vectors(128, 0),
                                     vectors(64, 10))
    tuned = [d.name for d in advice.depths if d.finetune_val_accuracy is not None]
    assert tuned == ["block2"]  # the head alone is always fine-tuned
    assert any("budget" in d.note for d in advice.depths)
    assert "Caution: 64 validation images" not in advice.recommendation.reason
    few = advisor(budget=0.0).run(synthetic_backbone(False), vectors(128, 0), vectors(16, 10))
    assert "Caution: 16 validation images" in few.recommendation.reason


def test_probe_and_standard_error_helpers() -> None:
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    accuracy, predictions, lr = linear_probe((x, y), (x, y), 2)
    assert accuracy >= 0.95 and predictions.shape == (64,) and lr > 0
    a = torch.tensor([1, 1, 0, 1]).numpy().astype(bool)
    assert paired_standard_error(a, a) == 0.0
    b = ~a
    assert paired_standard_error(a, b) > 0


def test_advice_needs_validation_data_and_activations_that_fit() -> None:
    with pytest.raises(ValueError, match="validation"):
        advisor().run(make_tiny_backbone(), make_loader(16), None)
    small = Advisor(attrs.evolve(CONFIG, cache_memory_gb=1e-5))
    with pytest.raises(MemoryError, match=r"at 3 depths: about .*--train-per-class"):
        small.run(make_tiny_backbone(), make_loader(16), make_loader(8))


# -- the command line ------------------------------------------------------------------------------
def test_advise_command_writes_its_files_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    tree = make_tree(tmp_path / "data", classes=3, n_train=8, n_test=2, size=32)
    output = tmp_path / "advice"
    argv = ["advise", "--data", str(tree), "--backbone", TINY, "--image-size", "32",
            "--batch-size", "8", "--epochs", "1", "--val-split", "0.25", "--output",
            str(output), *FAST]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "Recommendation:" in out and "the test set is not read" in out
    record = json.loads((output / "advise.json").read_text())
    assert [d["name"] for d in record["depths"]] == ["none", "stem", "block1", "block2"]
    assert record["recommendation"]["command"].startswith("finetune train --data ")
    assert record["recommendation"]["command"] in out
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--overwrite" in err


def test_copies_of_one_model_share_their_traces_and_train_as_alone(monkeypatch) -> None:
    traced = []
    original = plan.find_cuts
    monkeypatch.setattr(plan, "find_cuts", lambda model, mode, eval_graph=None: (
        traced.append(eval_graph is None), original(model, mode, eval_graph))[1])
    initial = make_tiny_backbone(seed=5)
    _, strategy, _ = depth_strategies(initial)[2]  # freeze through block1
    train = make_loader(24, seed=1, shuffle=True)
    config = attrs.evolve(CONFIG, epochs=1)
    weights = []
    for cache in (ActivationCaches(), ActivationCaches(copies=True),
                  ActivationCaches(copies=True)):
        trainers = [Trainer(copy.deepcopy(initial), copy.deepcopy(s), config, activations=cache)
                    for s in (strategy, LastLayerOnly(), strategy)]
        for trainer in trainers:
            trainer.fit(train)
        weights.append([t.backbone.model.state_dict() for t in trainers])
    # with copies=True one evaluation trace, and one training trace per freezing, serve
    # every copy: the third fit (the first's freezing again) traces nothing
    assert traced == [True, False, True, False]
    for alone, shared in zip(weights[0], weights[1], strict=True):
        assert all(torch.equal(alone[k], shared[k]) for k in alone)
