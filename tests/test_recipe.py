"""The training recipe: per-step lr schedules (also across optimizer rebuilds and resume),
gradient accumulation, label smoothing and clipping under the fp16 gradient scaler."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.gpu_check import StopAfter
from finetune.callbacks import Callback, Checkpoint
from finetune.data.preprocessing import Preprocessing
from finetune.model.backbone import Backbone
from finetune.strategies import FullUnfreeze
from finetune.train.schedules import StepSchedule, lr_multiplier, total_steps, warmup_steps
from finetune.train.step import OptimizerStep
from finetune.train.trainer import Trainer, flag_last
from tests.conftest import FAST, TINY, make_loader, make_tiny_backbone, make_tree, run_cli
from tests.test_trainer import FP32, HeadThenAll, assert_same_weights, weights


class StepLrs(Callback):
    """The head's lr and the global step after every batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, batch, outputs):
        head = next(g for g in trainer.optimizer.param_groups if g["name"] == "head")
        self.seen.append((trainer.state.global_step, head["lr"]))


def test_schedule_multipliers_at_given_steps():
    assert [lr_multiplier("constant", s, None, 4) for s in (0, 3, 4, 99)] == [0.25, 1, 1, 1]
    assert lr_multiplier("cosine", 2, 12, 2) == 1.0  # warm-up done: the decay starts at 1
    assert lr_multiplier("cosine", 7, 12, 2) == pytest.approx(0.5)  # half-way through decay
    assert lr_multiplier("linear", 9, 12, 0) == pytest.approx(0.25)
    assert lr_multiplier("one-cycle", 0, 10, 3) == pytest.approx(1 / 25)  # starts low
    assert lr_multiplier("one-cycle", 3, 10, 3) == 1.0  # peak after the warm-up
    assert lr_multiplier("one-cycle", 10, 10, 3) == pytest.approx(1 / 25 / 1e4)
    assert warmup_steps("one-cycle", None, 20) == 6 and warmup_steps("cosine", None, 20) == 0
    assert warmup_steps("cosine", 0.25, 20) == 5 and warmup_steps("cosine", 7, None) == 7
    with pytest.raises(ValueError, match="loader has no length"):
        StepSchedule("cosine", None, None)
    with pytest.raises(ValueError, match="give the warm-up in steps"):
        warmup_steps("constant", 0.1, None)
    assert total_steps(3, 7, 2) == 12 and total_steps(3, None, 2) is None


def test_schedule_scales_each_groups_own_base_lr():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    schedule = StepSchedule("cosine", 0, 10)
    for step in (0, 5):
        schedule.apply(optimizer, step)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.005])


def test_fit_sets_the_lr_every_optimizer_step():
    config = attrs.evolve(FP32, lr=1e-2, schedule="cosine", warmup=2)
    recorder = StepLrs()
    history = Trainer(make_tiny_backbone(), HeadThenAll(switch=9), config,
                      callbacks=[recorder]).fit(make_loader())  # 2 epochs x 4 batches
    expected = [1e-2 * lr_multiplier("cosine", s, 8, 2) for s in range(8)]
    assert [step for step, _ in recorder.seen] == list(range(1, 9))
    assert [lr for _, lr in recorder.seen] == pytest.approx(expected)
    assert history["lr/head"] == pytest.approx([expected[3], expected[7]])


def test_an_epoch_scheduler_is_a_factor_on_the_per_step_schedule():
    """One mechanism: a torch scheduler stepped per epoch multiplies the step's lr."""
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    config = attrs.evolve(FP32, epochs=2, lr=1e-2, schedule="linear", warmup=0)
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(), config, scheduler=scheduler)
    history = trainer.fit(make_loader())  # 4 batches per epoch: 8 optimizer steps
    # the last window of each epoch opened at steps 3 and 7 of 8
    expected = [1e-2 * lr_multiplier("linear", 3, 8, 0) * 1.0,
                1e-2 * lr_multiplier("linear", 7, 8, 0) * 0.5]
    assert history["lr/head"] == pytest.approx(expected)
    assert trainer.scheduler.factor == pytest.approx(0.25)  # stepped after each epoch


def test_resume_with_schedule_accumulation_and_rebuilt_optimizer_equals_a_straight_run(
        tmp_path: Path):
    """4 epochs straight == 2 + resume 2, with one-cycle, 3-batch accumulation (4 batches an
    epoch: a window of 3 and a remainder of 1) and a strategy that rebuilds the optimizer at
    the resume epoch: same weights and the same lr at every step."""
    config = attrs.evolve(FP32, epochs=4, lr=1e-2, schedule="one-cycle", accumulate_steps=3)
    straight_lrs = StepLrs()
    straight = make_tiny_backbone()
    Trainer(straight, HeadThenAll(switch=2), config, callbacks=[straight_lrs]).fit(make_loader())

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    Trainer(make_tiny_backbone(), HeadThenAll(switch=2), config,  # the same run, cut short
            callbacks=[checkpoint, StopAfter(epoch=1)]).fit(make_loader())
    resumed_lrs, resumed = StepLrs(), make_tiny_backbone(seed=7)
    trainer = Trainer(resumed, HeadThenAll(switch=2), config, callbacks=[resumed_lrs])
    trainer.fit(make_loader(), resume=checkpoint.last_path)

    assert_same_weights(weights(straight), weights(resumed))
    assert straight_lrs.seen[8:] == resumed_lrs.seen  # global step and lr, batch by batch
    assert trainer.state.global_step == 8  # 2 optimizer steps an epoch
    peak = max(lr for _, lr in straight_lrs.seen)
    assert peak == pytest.approx(1e-2, rel=0.2) and straight_lrs.seen[-1][1] < peak / 10


def test_resume_with_other_epochs_warns_when_a_schedule_decays(tmp_path: Path):
    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    config = attrs.evolve(FP32, epochs=1, schedule="linear")
    Trainer(make_tiny_backbone(), FullUnfreeze(), config, callbacks=[checkpoint]).fit(
        make_loader(n=8))
    with pytest.warns(RuntimeWarning, match=r"epochs 2 \(was 1\)"):
        Trainer(make_tiny_backbone(), FullUnfreeze(), attrs.evolve(config, epochs=2)).fit(
            make_loader(n=8), resume=checkpoint.last_path)


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(x).mean(dim=(2, 3)))


def _no_bn_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_module(NoBatchNorm(), head="fc", groups=(("stem", r"^stem\."),),
                                num_classes=3, name="nobn",
                                preprocessing=Preprocessing(resize_size=32, crop_size=32))


@pytest.mark.parametrize("optimizer", [None, functools.partial(torch.optim.SGD, momentum=0.9)])
def test_accumulating_two_batches_of_b_equals_one_batch_of_2b(optimizer):
    """30 images: batches of 4 with k=2 make windows (4,4)x3 + (4,2) — the same four steps as
    batches of 8 (8,8,8,6), the short remainder weighted by its true image count."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (30,), generator=generator)
    data = TensorDataset(torch.randn(30, 3, 16, 16, generator=generator), labels)
    results = []
    for batch, k in ((8, 1), (4, 2)):
        backbone = _no_bn_backbone()
        config = attrs.evolve(FP32, lr=1e-2, accumulate_steps=k, schedule="cosine")
        trainer = Trainer(backbone, FullUnfreeze(), config, optimizer=optimizer)
        trainer.fit(DataLoader(data, batch_size=batch))
        results.append((weights(backbone), trainer.state.global_step))
    (big, big_steps), (accumulated, accumulated_steps) = results
    assert big_steps == accumulated_steps == 8
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_accumulation_on_a_loader_without_length_still_steps_its_remainder():
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    assert [last for _, last in flag_last(iter(batches), None, look_ahead=True)] == [
        False, False, True]
    trainer = Trainer(_no_bn_backbone(), FullUnfreeze(),
                      attrs.evolve(FP32, epochs=1, accumulate_steps=2))
    trainer.fit(iter(batches))
    assert trainer.state.global_step == 2  # (2 batches) + (the remainder of 1)


def test_label_smoothing_trains_with_it_and_validates_without():
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(),
                      attrs.evolve(FP32, epochs=1, label_smoothing=0.1))
    assert trainer.loss_fn.label_smoothing == 0.1
    trainer.fit(make_loader())
    loader = make_loader(seed=1, shuffle=False)
    trainer.backbone.eval()
    with torch.no_grad():
        logits = torch.cat([trainer.backbone.model(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    plain = nn.functional.cross_entropy(logits, labels)
    smoothed = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert trainer.evaluate(loader).loss == pytest.approx(float(plain), rel=1e-5)
    assert float(plain) != pytest.approx(float(smoothed), rel=1e-3)
    with pytest.raises(ValueError, match="smooth inside that loss"):
        Trainer(make_tiny_backbone(), FullUnfreeze(), attrs.evolve(FP32, label_smoothing=0.1),
                loss=nn.NLLLoss())


def test_clipping_under_the_fp16_scaler_clips_true_gradients():
    """Clipped before unscaling, the step would be 1/scale of the clip norm."""
    weight = nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    step = OptimizerStep(lambda out, _: (out * 100).sum(), max_grad_norm=1.0,
                         device=torch.device("cpu"), precision="fp16")
    output = step(optimizer, lambda x: weight.unsqueeze(0).expand(len(x), 4), torch.zeros(2, 1),
                  torch.zeros(2), where="test")
    assert output.stepped
    assert float(weight.norm()) == pytest.approx(1.0, rel=1e-4)
    assert step.state_dict()["scale"] == 2.0**16


def test_nonfinite_loss_in_a_window_resets_it():
    weight = nn.Parameter(torch.zeros(2))
    step = OptimizerStep(lambda out, _: out.sum() / 0.0 * 0.0, accumulate_steps=2)
    with pytest.raises(FloatingPointError, match="loss is nan at here"):
        step(torch.optim.SGD([weight], lr=1.0), lambda x: weight.unsqueeze(0), torch.zeros(1, 1),
             torch.zeros(1), where="here")
    assert not step.pending and math.isclose(float(weight.sum()), 0.0)


def test_cli_trains_with_the_recipe_flags(tmp_path: Path, capsys):
    tree = make_tree(tmp_path / "data", classes=3, n_train=4, n_test=1, size=32)
    runs = tmp_path / "runs"
    code, _, err = run_cli(
        ["train", "--data", str(tree), "--backbone", TINY, "--weights", "none", "--epochs", "2",
         "--batch-size", "2", "--val-split", "0.25", "--strategy", "full-unfreeze", "--schedule",
         "cosine", "--warmup", "0.25", "--accumulate", "2", "--label-smoothing", "0.1",
         "--max-grad-norm", "1", "--checkpoint-dir", str(runs), *FAST], capsys)
    assert code == 0, err
    saved = torch.load(runs / "last.pt", weights_only=True)
    assert {key: saved["config"][key] for key in ("schedule", "warmup", "accumulate_steps",
                                                  "label_smoothing", "max_grad_norm")} == {
        "schedule": "cosine", "warmup": 0.25, "accumulate_steps": 2, "label_smoothing": 0.1,
        "max_grad_norm": 1.0}
    batches = math.ceil(saved["history"]["records"][0]["train_images"] / 2)
    assert saved["global_step"] == 2 * math.ceil(batches / 2)  # optimizer steps, not batches


def test_an_epoch_scheduler_resumes_from_a_state_saved_on_the_real_optimizer():
    """Older checkpoints hold the scheduler of the real optimizer (absolute lrs): the factor
    is read relative to its base lr."""
    from finetune.train.schedules import EpochScheduler

    weight = nn.Parameter(torch.zeros(1))
    real = torch.optim.SGD([weight], lr=1e-3)
    old = torch.optim.lr_scheduler.StepLR(real, step_size=1, gamma=0.5)
    real.step()
    old.step()
    old.step()  # two epochs in: lr 2.5e-4
    resumed = EpochScheduler(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                               gamma=0.5))
    resumed.load_state_dict(old.state_dict())
    assert resumed.factor == pytest.approx(0.25)
    resumed.step({"train_loss": 1.0})
    assert resumed.factor == pytest.approx(0.125)
    fresh = EpochScheduler(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                             gamma=0.5))
    fresh.load_state_dict(resumed.state_dict())
    assert fresh.factor == pytest.approx(0.125)
