"""`finetune.tuning.LrSearch`: the lr a task needs is found, the chosen run is the run a plain
fit at that lr makes, successive halving spends one epoch on losers, the grid grows past a
winning edge, and candidates of a cached strategy share one activation fill."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import tuning as tuning_module
from finetune.cache.plan import ActivationCaches
from finetune.cache.store import ActivationCache
from finetune.strategies import FullUnfreeze, LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer
from finetune.tuning import LrSearch, lr_grid, parse_grid, round_lr
from tests.conftest import make_loader, make_tiny_backbone

CONFIG = TrainConfig(epochs=3, lr=1.0, seed=0, precision="fp32", device="cpu",
                     feature_cache="on")


def separable(n: int, seed: int) -> DataLoader:
    """Three classes whose images differ by a colour offset: frozen random features separate
    them, but a linear head must move far — a large lr's job in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 32, 32, generator=generator) * 0.3
    images[torch.arange(n), labels] += 2.0
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + 1))


def trainers(strategy: Callable[[], object], config: TrainConfig = CONFIG
             ) -> Callable[[float, ActivationCaches], Trainer]:
    def make(lr: float, activations: ActivationCaches) -> Trainer:
        return Trainer(make_tiny_backbone(), strategy(), attrs.evolve(config, lr=lr),
                       activations=activations)
    return make


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}


def test_a_linear_probe_gets_the_large_lr_it_needs_and_one_shared_fill(monkeypatch) -> None:
    fills = []
    original = ActivationCache.fill
    monkeypatch.setattr(ActivationCache, "fill", lambda self, loader, *a, **k: (
        fills.append(len(loader.dataset)), original(self, loader, *a, **k))[1])
    train, val = separable(48, 0), separable(24, 10)
    tuning, trainer = LrSearch((1e-2, 3.2e-3, 3.2e-2), epochs=2).run(
        trainers(LastLayerOnly, attrs.evolve(CONFIG, epochs=2)), train, val)
    tried = {c.lr: c for c in tuning.candidates}
    assert tuning.chosen >= 3.2e-2 and tuning.chosen == trainer.config.lr
    assert tried[tuning.chosen].val_accuracy > tried[1e-2].val_accuracy
    assert max(tried) == 0.1  # the top edge won outright, so the grid grew past it
    assert fills == [48, 24]  # train and val, once for every candidate
    assert "cached activations" in tuning.schedule
    assert all(c.epochs == 2 for c in tuning.candidates)
    assert trainer.history["val_accuracy"][-1] == tried[tuning.chosen].val_accuracy


def test_halving_trains_losers_one_epoch_and_the_chosen_run_is_a_plain_fit_at_its_lr() -> None:
    config = attrs.evolve(CONFIG, feature_cache="off")
    train, val = make_loader(32, seed=0), make_loader(16, seed=5, shuffle=False)
    tuning, chosen = LrSearch((1e-2, 1e-4, 1.0), epochs=3).run(
        trainers(FullUnfreeze, config), train, val)
    epochs = sorted(c.epochs for c in tuning.candidates)
    assert epochs[-1] == 3 and epochs[:-1] == [1] * (len(epochs) - 1)
    assert "successive halving" in tuning.schedule
    # the chosen candidate went on from its epoch-1 state held in memory; a fit straight
    # through at its lr gives the same weights and the same history
    plain = Trainer(make_tiny_backbone(), FullUnfreeze(), attrs.evolve(config, lr=tuning.chosen))
    plain.fit(make_loader(32, seed=0), make_loader(16, seed=5, shuffle=False))
    for name, tensor in weights(plain).items():
        assert torch.equal(tensor, weights(chosen)[name]), name
    assert plain.history["val_accuracy"] == chosen.history["val_accuracy"]
    assert not chosen.history.stopped_early


class FakeTrial:
    """Scores a candidate by a function of its lr, without training."""

    score: Callable[[float], float] = staticmethod(lambda lr: 0.5)

    def __init__(self, *args: object) -> None:
        self.cached, self.epoch_seconds, self.trained = False, 1.0, []

    def advance(self, run, until: int) -> None:
        if run.epochs >= until:
            return
        self.trained.append((run.lr, until))
        run.epochs, run.val_accuracy, run.val_loss = until, type(self).score(run.lr), 1.0
        if until >= 3:
            run.trainer = f"trainer at {run.lr:g}"


@pytest.mark.parametrize(("score", "chosen", "extended"), [
    (lambda lr: -abs(lr - 5e-3), 5e-3, [5e-3, 1.6e-2]),  # up past the best, then it stops
    (lambda lr: -abs(lr - 0.5), 1.6e-2, [5e-3, 1.6e-2]),  # two steps at most
    (lambda lr: -lr, 1.6e-5, [1.6e-5, 5e-5]),  # the same downwards
    (lambda lr: 0.5, 5e-4, []),  # a tie at the edge grows nothing
    (lambda lr: -abs(lr - 5e-4), 5e-4, []),  # an interior best grows nothing
])
def test_the_grid_grows_past_an_edge_that_wins_outright(monkeypatch, score, chosen,
                                                         extended) -> None:
    monkeypatch.setattr(FakeTrial, "score", staticmethod(score))
    monkeypatch.setattr(tuning_module, "_Trial", FakeTrial)
    result, trainer = LrSearch((5e-4, 1.6e-4, 1.6e-3), epochs=3).run(None, [], [])
    assert result.chosen == chosen and trainer == f"trainer at {chosen:g}"
    grown = sorted({c.lr for c in result.candidates} - set(lr_grid(5e-4)))
    assert grown == extended


def test_halving_keeps_the_best_third_until_one_is_left(monkeypatch) -> None:
    monkeypatch.setattr(FakeTrial, "score", staticmethod(lambda lr: -abs(lr - 3e-3)))
    monkeypatch.setattr(tuning_module, "_Trial", FakeTrial)
    grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    result, _ = LrSearch(grid, epochs=9).run(None, [], [])
    epochs = {c.lr: c.epochs for c in result.candidates}
    assert epochs == {1e-4: 1, 3e-4: 1, 1e-3: 3, 3e-3: 9, 1e-2: 1, 3e-2: 1}


def test_a_shared_cache_is_refilled_for_a_prefix_with_other_weights() -> None:
    shared = ActivationCaches()
    train = separable(24, 0)
    first = Trainer(make_tiny_backbone(seed=0), LastLayerOnly(), attrs.evolve(CONFIG, epochs=1),
                    activations=shared)
    first.fit(train)
    filled = shared.fill_seconds
    assert len(shared) == 1 and filled > 0  # kept past fit: its owner releases it
    same = Trainer(make_tiny_backbone(seed=0), LastLayerOnly(), attrs.evolve(CONFIG, epochs=1),
                   activations=shared)
    same.fit(train)
    assert shared.fill_seconds == filled  # equal prefix weights: no second fill
    other = Trainer(make_tiny_backbone(seed=3), LastLayerOnly(), attrs.evolve(CONFIG, epochs=1),
                    activations=shared)
    other.fit(train)
    assert shared.fill_seconds > filled  # other weights: never another model's activations
    alone = Trainer(make_tiny_backbone(seed=3), LastLayerOnly(), attrs.evolve(CONFIG, epochs=1))
    alone.fit(train)
    assert alone.history["train_loss"] == other.history["train_loss"]


def test_grid_text_and_rounding() -> None:
    assert lr_grid(5e-4) == (1.6e-4, 5e-4, 1.6e-3)
    assert round_lr(0.0015811) == 1.6e-3
    assert parse_grid("1e-3, 1e-4,1e-4") == (1e-4, 1e-3)
    for bad, message in (("", "empty"), ("0.1,x", "not a number"), ("-1", "not a learning")):
        with pytest.raises(ValueError, match=message):
            parse_grid(bad)
    with pytest.raises(ValueError, match="validation data"):
        LrSearch((1e-3,), epochs=1).run(trainers(LastLayerOnly), separable(8, 0), None)
