"""`LrSearch`: the lr a task needs is found, the chosen run is the run a plain
fit at that lr makes, a candidate stops once behind the best run, the grid grows past a
winning edge, and the candidates of a cached strategy share one activation fill."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone
from finetune.cache import plan
from finetune.cache.plan import ActivationCaches
from finetune.strategies import FullUnfreeze, LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.step import NonFiniteLossError
from finetune.train.trainer import Trainer
from finetune.tuning.search import (
    ConfigChange,
    LrSearch,
    Score,
    Search,
    SearchSpace,
    Selection,
    lr_grid,
    lr_space,
    parse_grid,
    round_lr,
)
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
    def make(change: ConfigChange, activations: ActivationCaches) -> Trainer:
        return Trainer(make_tiny_backbone(), strategy(), change(config),
                       activations=activations)
    return make


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}


def test_a_linear_probe_gets_the_large_lr_it_needs_and_one_shared_fill(monkeypatch) -> None:
    fills = []
    original = plan.fill_together
    monkeypatch.setattr(plan, "fill_together", lambda caches, prefix, loader, *a, **k: (
        fills.append(len(loader.dataset)), original(caches, prefix, loader, *a, **k))[1])
    train, val = separable(48, 0), separable(24, 10)
    tuning, trainer = LrSearch((1e-2, 3.2e-3, 3.2e-2), epochs=2).run(
        trainers(LastLayerOnly, attrs.evolve(CONFIG, epochs=2)), train, val)
    tried = {c.lr: c for c in tuning.candidates}
    assert tuning.chosen >= 3.2e-2 and tuning.chosen == trainer.config.lr
    assert tried[tuning.chosen].val_accuracy > tried[1e-2].val_accuracy
    assert tried[tuning.chosen].val_loss < tried[1e-2].val_loss
    assert max(tried) > 3.2e-2  # the top edge won, so the grid grew past it
    assert fills == [48, 24]  # train and val, once for every candidate
    assert trainer.history["val_accuracy"][-1] == tried[tuning.chosen].val_accuracy


class Dropped(torch.nn.Module):
    """The tiny net with dropout before its head: training draws from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny_backbone().model
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net.fc(self.drop(net.pool(net.block2(net.block1(net.stem(x)))).flatten(1)))


def test_the_first_lr_trains_as_a_plain_fit_and_the_chosen_run_is_one() -> None:
    """The peeks at a third of an epoch leave a run as it was: the chosen run is the run a
    plain fit at its lr makes, weights and history alike."""
    config = attrs.evolve(CONFIG, feature_cache="off")

    def make(change: ConfigChange, activations: ActivationCaches) -> Trainer:
        torch.manual_seed(0)
        backbone = Backbone.from_module(Dropped(), head="net.fc", num_classes=3, name="dropped",
                                        groups=(("body", r"^net\.(stem|block)"),))
        return Trainer(backbone, FullUnfreeze(), change(config),
                       activations=activations)

    def loaders() -> tuple[DataLoader, DataLoader]:
        train = make_loader(32, seed=0)
        return (DataLoader(train.dataset, batch_size=4, shuffle=True),  # global-RNG shuffle
                make_loader(16, seed=5, shuffle=False))

    tuning, chosen = LrSearch((1e-2, 1e-7), epochs=3).run(make, *loaders())
    assert tuning.chosen == 1e-2
    assert [c.epochs for c in tuning.candidates] == [3, 0.333]
    plain = make(lr_space((1e-2,)).apply(1e-2), ActivationCaches())
    plain.fit(*loaders())
    for name, tensor in weights(plain).items():
        assert torch.equal(tensor, weights(chosen)[name]), name
    assert plain.history["val_loss"] == chosen.history["val_loss"]


VAL_IMAGES = 60


def report(losses: Sequence[float], correct: Sequence[bool]) -> SimpleNamespace:
    """What Trainer.evaluate reports, as far as a search reads it."""
    losses, correct = np.asarray(losses, dtype=float), np.asarray(correct, dtype=bool)
    targets = np.zeros(len(losses), dtype=np.int64)
    return SimpleNamespace(losses=losses, targets=targets, predictions=np.where(correct, 0, 1),
                           accuracy=float(correct.mean()), loss=float(losses.mean()))


class ScriptedTrainer:
    """Stands in for a Trainer: 3 steps an epoch, validation from `images(lr, epochs)` —
    each image's loss and correctness — by default every image's loss `2 - score(lr, at)`."""

    score: Callable[[float, float], float] = staticmethod(lambda lr, at: 0.5)
    images: Callable[[float, float], SimpleNamespace] | None = None
    fits: ClassVar[list[float]] = []

    def __init__(self, change: ConfigChange, activations: object) -> None:
        self.config = change(TrainConfig(epochs=3))
        self.lr, self.callbacks = self.config.lr, []
        self.state = SimpleNamespace(epoch=0, batches_per_epoch=3, global_step=0,
                                     device=torch.device("cpu"), should_stop=False,
                                     val_report=None)

    def _report(self, at: float) -> SimpleNamespace:
        if type(self).images is not None:
            return type(self).images(self.lr, at)
        return report([2.0 - type(self).score(self.lr, at)] * VAL_IMAGES, [True] * VAL_IMAGES)

    def evaluate(self, loader: object) -> SimpleNamespace:
        return self._report(1 / 3)

    def fit(self, train: object, val: object) -> None:
        type(self).fits.append(self.lr)
        for epoch in range(self.config.epochs):
            self.state.epoch = epoch
            for callback in self.callbacks:
                callback.on_epoch_start(self, epoch)
            for _ in range(3):
                self.state.global_step += 1
                for callback in self.callbacks:
                    callback.on_optimizer_step(self, self.state.global_step)
            self.state.val_report = self._report(epoch + 1)
            metrics = {"val_accuracy": self.state.val_report.accuracy,
                       "val_loss": self.state.val_report.loss}
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
            if self.state.should_stop:
                return


def scripted(monkeypatch, score: Callable[[float, float], float] | None = None,
             images: Callable[[float, float], SimpleNamespace] | None = None,
             selection: Selection | None = None) -> LrSearch:
    monkeypatch.setattr(ScriptedTrainer, "score", staticmethod(score or (lambda lr, at: 0.5)))
    monkeypatch.setattr(ScriptedTrainer, "images",
                        staticmethod(images) if images is not None else None)
    monkeypatch.setattr(ScriptedTrainer, "fits", [])
    return LrSearch((5e-4, 1.6e-4, 1.6e-3), epochs=3, selection=selection)


@pytest.mark.parametrize(("score", "chosen", "grown"), [
    (lambda lr, at: -abs(lr - 5e-3), 5e-3, [5e-3, 1.6e-2]),  # past the best, then it stops
    (lambda lr, at: -abs(lr - 0.5), 1.6e-2, [5e-3, 1.6e-2]),  # two steps at most
    (lambda lr, at: -lr, 1.6e-5, [1.6e-5, 5e-5]),  # the same downwards
    (lambda lr, at: 0.5, 5e-4, []),  # a tie keeps the first lr and grows nothing
    (lambda lr, at: -abs(lr - 5e-4), 5e-4, []),  # an interior best grows nothing
])
def test_the_grid_grows_past_an_edge_the_best_run_holds(monkeypatch, score, chosen,
                                                        grown) -> None:
    result, trainer = scripted(monkeypatch, score).run(ScriptedTrainer, [], [])
    assert result.chosen == chosen and trainer.lr == chosen
    assert sorted({c.lr for c in result.candidates} - {5e-4, 1.6e-4, 1.6e-3}) == grown
    assert result.to_dict()["select"] == "loss"


def test_a_race_stops_a_candidate_behind_beyond_noise_and_keeps_the_better_finisher(
        monkeypatch) -> None:
    # 1.6e-3 leads until epoch 3, then falls behind: a one-epoch rung would have chosen it;
    # 1.6e-4 is behind at the peek on every image
    def score(lr: float, at: float) -> float:
        return {5e-4: at, 1.6e-4: at / 2, 1.6e-3: 2 * at if at < 3 else 2.9}[lr]

    result, _ = scripted(monkeypatch, score).run(ScriptedTrainer, [], [])
    epochs = {c.lr: c.epochs for c in result.candidates}
    assert result.chosen == 5e-4
    assert epochs == {5e-4: 3, 1.6e-4: 0.333, 1.6e-3: 3}
    assert ScriptedTrainer.fits == [5e-4, 1.6e-4, 1.6e-3]  # the first lr first, once each


def test_a_candidate_that_diverges_is_out_and_the_search_goes_on(monkeypatch) -> None:
    """1.6e-3 and beyond blow up mid-run (a non-finite training loss); 5e-4's own run is
    chosen; a first lr that diverges is an error that says what to do."""
    search = scripted(monkeypatch, score=lambda lr, at: -abs(lr - 5e-4))
    fit = ScriptedTrainer.fit

    def diverging(self: ScriptedTrainer, train: object, val: object) -> None:
        if self.lr >= 1.6e-3:
            type(self).fits.append(self.lr)
            raise NonFiniteLossError("loss is nan at epoch 1")
        fit(self, train, val)

    monkeypatch.setattr(ScriptedTrainer, "fit", diverging)
    result, trainer = search.run(ScriptedTrainer, [], [])
    assert result.chosen == 5e-4 and trainer.lr == 5e-4
    assert 1.6e-3 in ScriptedTrainer.fits
    first = LrSearch((1.6e-2, 5e-4), epochs=3)
    with pytest.raises(ValueError, match=r"first lr, 0.016, diverged .* start the grid lower"):
        first.run(ScriptedTrainer, [], [])


def test_a_non_finite_validation_loss_counts_as_the_worst() -> None:
    nan = Score.of(report([float("nan")] + [0.5] * 9, [False] + [True] * 9))
    assert nan.loss < float("inf") and Selection().behind(nan, Score.of(report([0.5] * 10,
                                                                               [True] * 10)))


def saturated(lr: float, at: float) -> SimpleNamespace:
    """Every lr gets every validation image right (accuracy saturates); 1.6e-3 is more
    confident on each of them, by a margin that varies from image to image."""
    jitter = 0.05 * np.sin(np.arange(VAL_IMAGES))
    level = {5e-4: 0.6, 1.6e-4: 0.9, 1.6e-3: 0.3}.get(lr, 0.45)
    return report(level / at + jitter, [True] * VAL_IMAGES)


def test_where_accuracy_saturates_the_loss_separates_and_chooses(monkeypatch) -> None:
    by_loss, _ = scripted(monkeypatch, images=saturated).run(ScriptedTrainer, [], [])
    assert by_loss.chosen == 1.6e-3 and by_loss.select == "loss"
    by_accuracy, _ = scripted(monkeypatch, images=saturated,
                              selection=Selection("accuracy")).run(ScriptedTrainer, [], [])
    assert by_accuracy.chosen == 5e-4  # every accuracy ties: the first lr is kept


def one_image_behind(lr: float, at: float) -> SimpleNamespace:
    """1.6e-3 gets one image fewer right at the end of epoch 1 (and a loss of 1 higher on
    it); elsewhere it is 1.6e-4's twin and 5e-4's better."""
    correct = np.ones(VAL_IMAGES, dtype=bool)
    losses = np.full(VAL_IMAGES, 0.5 if lr == 5e-4 else 0.4)
    if lr == 1.6e-3 and at == 1:
        correct[7], losses[7] = False, 1.4
    return report(losses, correct)


@pytest.mark.parametrize("criterion", ["loss", "accuracy", "accuracy+loss"])
def test_a_challenger_one_image_behind_at_an_epoch_end_goes_on(monkeypatch, criterion) -> None:
    result, _ = scripted(monkeypatch, images=one_image_behind,
                         selection=Selection(criterion)).run(ScriptedTrainer, [], [])
    epochs = {c.lr: c.epochs for c in result.candidates}
    assert epochs[1.6e-3] == 3  # not stopped on the dip
    dip, rival = (Score.of(one_image_behind(lr, 1)) for lr in (1.6e-3, 1.6e-4))
    assert not Selection(criterion).behind(dip, rival)
    assert Selection(criterion, stop_z=0).behind(dip, rival)  # it is behind, within noise


def test_behind_beyond_noise_is_a_paired_test_on_the_same_images() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 2.0, VAL_IMAGES)
    ours = Score.of(report(base + 0.3 + rng.normal(0, 0.05, VAL_IMAGES), [True] * VAL_IMAGES))
    theirs = Score.of(report(base, [True] * VAL_IMAGES))
    selection = Selection()
    # each image 0.3 worse: far beyond noise, though the spread across images is wide
    assert selection.behind(ours, theirs) and not selection.behind(theirs, ours)
    noisy = Score.of(report(base + rng.normal(0.02, 0.5, VAL_IMAGES), [True] * VAL_IMAGES))
    assert not selection.behind(noisy, theirs)  # 0.02 worse on average, 0.5 of noise
    with pytest.raises(ValueError, match="different validation images"):
        selection.behind(ours, Score.of(report(base[:10], [True] * 10)))


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


def test_a_shared_cache_never_serves_one_loaders_activations_to_another() -> None:
    """Cached activations are keyed by loader; the cache holds each cached loader, so a new
    loader (other images) can never take a dead one's id and its activations."""
    shared = ActivationCaches()
    config = attrs.evolve(CONFIG, epochs=1)
    for seed in range(3):  # each loader is dropped after its fit
        trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), config, activations=shared)
        trainer.fit(separable(24, seed))
        alone = Trainer(make_tiny_backbone(), LastLayerOnly(), config)
        alone.fit(separable(24, seed))
        assert trainer.history["train_loss"] == alone.history["train_loss"]


def test_a_search_space_tunes_weight_decay_where_it_decides_the_fit() -> None:
    """The search varies what its space names: here weight decay, from a value so large that
    the head cannot leave zero (the first, as a preset's would be) to none; the race stops
    the hopeless value's rivals only when behind, and the chosen run is the one at its value."""
    space = SearchSpace("weight_decay", (30.0, 0.0, 1e-4), scale="listed")
    config = attrs.evolve(CONFIG, lr=0.1, epochs=3)
    search = Search(space, epochs=3)
    tuning, trainer = search.run(trainers(LastLayerOnly, config), separable(48, 0),
                                 separable(48, 7))
    assert tuning.parameter == "weight_decay" and tuning.chosen in (0.0, 1e-4)
    assert trainer.config.weight_decay == tuning.chosen and trainer.config.lr == 0.1
    assert [c["weight_decay"] for c in tuning.to_dict()["candidates"]] == [30.0, 0.0, 1e-4]
    losses = {c.value: c.val_loss for c in tuning.candidates}
    assert losses[tuning.chosen] < losses[30.0]
    assert "weight_decay" in tuning.describe()
    with pytest.raises(ValueError, match="scale='listed'"):
        SearchSpace("weight_decay", (0.0, 1e-4))  # a log grid cannot hold 0


def test_a_trainer_that_ignores_the_candidates_change_is_refused() -> None:
    def ignoring(change: ConfigChange, activations: ActivationCaches) -> Trainer:
        return Trainer(make_tiny_backbone(), LastLayerOnly(), attrs.evolve(CONFIG, epochs=1),
                       activations=activations)

    with pytest.raises(ValueError, match="build its config with the change it is given"):
        LrSearch((1e-3,), epochs=1).run(ignoring, separable(8, 0), separable(8, 1))
