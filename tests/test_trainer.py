"""Trainer: the loop, the optimizer following the strategy, repeatability, exact resume,
non-finite loss, precision choice and checkpoint compatibility."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

from finetune import Backbone
from finetune.callbacks import Callback, Checkpoint, StopFit
from finetune.errors import CheckpointError
from finetune.runtime import precision as precision_module
from finetune.strategies import FreezeFraction, FreezeStrategy, FullUnfreeze, LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.step import NonFiniteLossError
from finetune.train.trainer import Trainer
from tests.conftest import make_loader, make_tiny_backbone

FP32 = TrainConfig(epochs=2, lr=1e-2, seed=0, precision="fp32", device="cpu")


@attrs.frozen
class HeadThenAll(FreezeStrategy):
    """A scheduled strategy: the head alone until `switch`, then everything."""

    switch: int = 1

    def trainable(self, backbone, epoch: int) -> Mapping[str, float]:
        names = (backbone.named_parameters_in("head") if epoch < self.switch
                 else backbone.model.named_parameters())
        return {name: 1.0 for name, _ in names}

    def changes_at(self, epoch: int) -> bool:
        return epoch == self.switch


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.errors: list[BaseException] = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start:{epoch}")

    def on_optimizer_step(self, trainer, step):
        assert step == trainer.state.global_step
        self.events.append(f"step:{step}")

    def on_train_batch_end(self, trainer, batch, outputs):
        self.events.append("batch")

    def on_validation_start(self, trainer):
        self.events.append("validation_start")

    def on_validation_end(self, trainer, report):
        self.events.append("validation_end")

    def on_epoch_end(self, trainer, metrics):
        self.events.append(f"epoch_end:{int(metrics['epoch'])}")

    def on_fit_end(self, trainer, history):
        self.events.append("fit_end")

    def on_exception(self, trainer, error):
        self.events.append("exception")
        self.errors.append(error)


def weights(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def test_fit_trains_head_only_and_leaves_frozen_weights_and_bn_stats_alone():
    backbone = make_tiny_backbone()
    before = weights(backbone)
    history = Trainer(backbone, LastLayerOnly(), FP32).fit(make_loader(), make_loader(seed=1))
    after = weights(backbone)
    assert len(history) == 2
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr/head"} <= set(
        history.records[0])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    for key in before:
        if not key.startswith("fc."):
            assert torch.equal(before[key], after[key]), key  # incl. BN running stats


def test_optimizer_holds_exactly_the_trainable_parameters():
    backbone = make_tiny_backbone()
    trainer = Trainer(backbone, FreezeFraction(0.5), FP32)
    trainer.fit(make_loader())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    frozen = {id(p) for p in backbone.parameters() if not p.requires_grad}
    assert frozen and held == trainable
    assert not held & frozen


def test_scheduled_strategy_rebuilds_optimizer_carries_adam_state_and_scheduler_follows():
    backbone = make_tiny_backbone()
    built = []

    def adam(groups):
        built.append([g["name"] for g in groups])
        return torch.optim.Adam(groups)

    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    trainer = Trainer(backbone, HeadThenAll(switch=1), attrs.evolve(FP32, lr=1e-3),
                      optimizer=adam, scheduler=scheduler)
    history = trainer.fit(make_loader())
    assert built == [["head"], ["stem", "block1", "block2", "head"]]
    assert all(p.requires_grad for p in backbone.parameters())
    steps = {name: int(trainer.optimizer.state[p]["step"]) for name, p in
             backbone.model.named_parameters()}
    assert steps["fc.weight"] == 8  # 4 batches per epoch, state kept across the rebuild
    assert steps["stem.0.weight"] == 4  # trained for one epoch only
    assert history["lr/head"] == [1e-3, 5e-4]
    assert history["lr/stem"] == [5e-4]  # the rebuilt scheduler is one epoch in


def test_two_runs_with_the_same_seed_give_identical_weights_and_another_seed_does_not():
    def run(seed: int) -> dict[str, torch.Tensor]:
        backbone = make_tiny_backbone()
        Trainer(backbone, FullUnfreeze(), attrs.evolve(FP32, seed=seed)).fit(make_loader())
        return weights(backbone)

    first, second, other = run(0), run(0), run(1)
    assert_same_weights(first, second)
    assert not torch.equal(first["stem.0.weight"], other["stem.0.weight"])


def test_resume_continues_exactly(tmp_path: Path):
    """4 epochs straight == 2 epochs, checkpoint, fresh objects, resume for 2 more — with a
    shuffled loader, a scheduled strategy that switches at the resume point and a scheduler."""
    config = attrs.evolve(FP32, epochs=4, lr=1e-3)
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7)

    straight = make_tiny_backbone()
    Trainer(straight, HeadThenAll(switch=2), config, scheduler=scheduler).fit(make_loader())

    first_half = make_tiny_backbone()
    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    Trainer(first_half, HeadThenAll(switch=2), attrs.evolve(config, epochs=2),
            callbacks=[checkpoint], scheduler=scheduler).fit(make_loader())

    resumed = make_tiny_backbone(seed=7)  # different init: the checkpoint must overwrite it
    resumed_checkpoint = Checkpoint(tmp_path / "again", monitor="train_loss", mode="min")
    trainer = Trainer(resumed, HeadThenAll(switch=2), config, callbacks=[resumed_checkpoint],
                      scheduler=scheduler)
    history = trainer.fit(make_loader(), resume=checkpoint.last_path)

    assert_same_weights(weights(straight), weights(resumed))
    assert len(history) == 4 and history["epoch"] == [0, 1, 2, 3]
    # Resumed into a fresh folder (no best.pt there): best is tracked anew from epoch 2.
    resumed_losses = history["train_loss"][2:]
    assert resumed_checkpoint.best == min(resumed_losses)
    assert resumed_checkpoint.best_epoch == 2 + resumed_losses.index(min(resumed_losses))


def test_resume_refuses_other_class_count_architecture_or_strategy(tmp_path: Path):
    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    Trainer(make_tiny_backbone(), LastLayerOnly(), attrs.evolve(FP32, epochs=1),
            callbacks=[checkpoint]).fit(make_loader())
    with pytest.raises(CheckpointError, match=r"tinynet with 3 classes.*tinynet with 4 classes"):
        Trainer(make_tiny_backbone(num_classes=4), LastLayerOnly(), FP32).fit(
            make_loader(num_classes=4), resume=checkpoint.last_path)
    other = make_tiny_backbone()
    other.name = "othernet"
    with pytest.raises(CheckpointError, match=r"holds tinynet .* but this trainer has othernet"):
        Trainer(other, LastLayerOnly(), FP32).fit(make_loader(), resume=checkpoint.last_path)
    with pytest.raises(CheckpointError, match=r"strategy .*LastLayerOnly.*FullUnfreeze"):
        Trainer(make_tiny_backbone(), FullUnfreeze(), FP32).fit(
            make_loader(), resume=checkpoint.last_path)


def test_non_finite_loss_names_epoch_and_batch_after_callbacks_are_told():
    class NaNAfter(nn.Module):
        def __init__(self, calls: int) -> None:
            super().__init__()
            self.calls, self.inner = calls, nn.CrossEntropyLoss()

        def forward(self, logits, labels):
            self.calls -= 1
            loss = self.inner(logits, labels)
            return loss * float("nan") if self.calls < 0 else loss

    recorder = Recorder()
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(), FP32, callbacks=[recorder],
                      loss=NaNAfter(calls=4 + 2))  # 4 batches per epoch: fails at epoch 1 batch 2
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, batch 2"):
        trainer.fit(make_loader())
    assert recorder.events[-1] == "exception"
    assert isinstance(recorder.errors[0], NonFiniteLossError)


def test_events_fire_in_order():
    recorder = Recorder()
    Trainer(make_tiny_backbone(), LastLayerOnly(), FP32, callbacks=[recorder]).fit(
        make_loader(n=16), make_loader(n=8, seed=1))
    def epoch(first_step: int) -> list[str]:
        return [f"step:{first_step}", "batch", f"step:{first_step + 1}", "batch",
                "validation_start", "validation_end"]

    assert recorder.events == (["fit_start", "epoch_start:0", *epoch(1), "epoch_end:0",
                                "epoch_start:1", *epoch(3), "epoch_end:1", "fit_end"])


def test_optimizer_step_fires_once_per_step_when_batches_accumulate():
    recorder = Recorder()
    config = attrs.evolve(FP32, epochs=1, accumulate_steps=3)
    Trainer(make_tiny_backbone(), LastLayerOnly(), config, callbacks=[recorder]).fit(
        make_loader(n=40))  # 5 batches: windows of 3 and 2 (the epoch's remainder)
    steps = [e for e in recorder.events if e.startswith("step:")]
    assert steps == ["step:1", "step:2"]
    # the step closes the third batch's window, before that batch's on_train_batch_end
    assert recorder.events[2:6] == ["batch", "batch", "step:1", "batch"]


class SwapForValidation(Callback):
    """What an EMA callback does: other weights for the validation pass, the trained ones
    back after it."""

    def __init__(self) -> None:
        self.saved: dict[str, torch.Tensor] | None = None
        self.val_accuracy: list[float] = []

    def on_validation_start(self, trainer):
        self.saved = weights(trainer.backbone)
        with torch.no_grad():
            trainer.backbone.model.fc.weight.zero_()
            trainer.backbone.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))  # always "2"

    def on_validation_end(self, trainer, report):
        trainer.backbone.model.load_state_dict(self.saved)
        self.val_accuracy.append(report.accuracy)


def test_a_callback_may_swap_weights_in_for_validation_only():
    val = make_loader(n=16, seed=1, shuffle=False)
    swap = SwapForValidation()
    backbone = make_tiny_backbone()
    Trainer(backbone, LastLayerOnly(), FP32, callbacks=[swap]).fit(make_loader(), val)
    labels = torch.cat([y for _, y in val])
    always_two = float((labels == 2).float().mean())
    assert swap.val_accuracy == [pytest.approx(always_two)] * 2
    reference = make_tiny_backbone()
    Trainer(reference, LastLayerOnly(), FP32).fit(make_loader(), val)
    assert_same_weights(weights(backbone), weights(reference))  # training never saw the swap


class StopAtBatch(Callback):
    def on_train_batch_end(self, trainer, batch, outputs):
        if trainer.state.global_step == 2:
            raise StopFit("enough")


def test_a_callback_ends_the_fit_at_once_by_raising_stop_fit():
    recorder = Recorder()
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), FP32,
                      callbacks=[StopAtBatch(), recorder])
    with pytest.raises(StopFit, match="enough"):
        trainer.fit(make_loader())
    assert recorder.events[-1] == "exception" and "fit_end" not in recorder.events
    assert trainer.state.global_step == 2 and len(trainer.history) == 0


def test_evaluate_and_predict_agree_with_a_manual_forward_pass():
    backbone = make_tiny_backbone()
    trainer = Trainer(backbone, LastLayerOnly(), FP32, classes=["a", "b", "c"])
    loader = make_loader(n=24, shuffle=False)
    report = trainer.evaluate(loader)
    images, labels = loader.dataset.tensors
    backbone.eval()
    with torch.no_grad():
        logits = backbone(images)
    expected = (logits.argmax(1) == labels).float().mean().item()
    assert report.accuracy == pytest.approx(expected)
    assert report.loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(),
                                        rel=1e-5)
    assert report.classes == ("a", "b", "c")
    assert torch.equal(trainer.predict(loader), logits.argmax(1))
    assert trainer.predict(loader, probabilities=True).sum(1) == pytest.approx(torch.ones(24))


def test_optimizer_instance_is_a_template_and_scheduler_instance_is_refused():
    backbone = make_tiny_backbone()
    template = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    trainer = Trainer(backbone, LastLayerOnly(), FP32, optimizer=template)
    trainer.fit(make_loader(n=16))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.defaults["momentum"] == 0.9
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in backbone.head.parameters()}
    scheduler = torch.optim.lr_scheduler.StepLR(template, step_size=1)
    with pytest.raises(TypeError, match="scheduler must be a factory"):
        Trainer(backbone, LastLayerOnly(), FP32, scheduler=scheduler)


def test_auto_precision_uses_the_probe_verdict_and_bf16_trains(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision_module, "probe_precision",
                        lambda model, images, channels_last: ("bf16", {}))
    monkeypatch.setattr(precision_module, "_CACHE", {})
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(),
                      attrs.evolve(FP32, precision="auto", epochs=1, channels_last=True))
    history = trainer.fit(make_loader(n=16))
    assert trainer.state.precision == "bf16" and trainer.state.channels_last
    assert torch.isfinite(torch.tensor(history["train_loss"])).all()

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision_module, "_CACHE", {})
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(),
                      attrs.evolve(FP32, precision="auto", epochs=1, channels_last=False))
    trainer.fit(make_loader(n=16))
    assert trainer.state.precision == "fp32" and not trainer.state.channels_last


@pytest.mark.parametrize(("fp32", "bf16", "expected"),
                         [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 2.0, "fp32")])
def test_probe_keeps_bf16_only_when_clearly_faster(monkeypatch, fp32, bf16, expected):
    timings = {"fp32": fp32, "bf16": bf16}
    monkeypatch.setattr(precision_module, "least_step_seconds",
                        lambda model, images, variants, steps: [timings[p] for p, _ in variants])
    choice, seconds = precision_module.probe_precision(nn.Linear(2, 2), torch.zeros(1, 2), False)
    assert choice == expected and seconds == timings


@pytest.mark.parametrize(("nchw", "nhwc", "expected"),
                         [(1.0, 0.5, True), (1.0, 0.97, False), (1.0, 2.0, False)])
def test_layout_probe_keeps_channels_last_only_when_faster_per_model(
        monkeypatch, nchw, nhwc, expected):
    calls = []

    def timed(model, images, variants):
        calls.extend(layout for _, layout in variants)
        return [nhwc if layout else nchw for _, layout in variants]

    monkeypatch.setattr(precision_module, "least_step_seconds", timed)
    monkeypatch.setattr(precision_module, "_LAYOUTS", {})
    model, twin = make_tiny_backbone(), make_tiny_backbone(seed=1)
    resolve = precision_module.resolve_channels_last
    cpu = torch.device("cpu")
    assert resolve("auto", model, cpu, (3, 32, 32), "fp32") is expected
    assert resolve("auto", twin, cpu, (3, 32, 32), "fp32") is expected
    assert len(calls) == 2  # one timing per layout; a model built alike shares the verdict
    other = make_tiny_backbone()
    other.model.fc = nn.Linear(16, 3, bias=False)  # same name, another structure: probed
    resolve("auto", other, cpu, (3, 32, 32), "fp32")
    assert len(calls) == 4
    assert resolve(False, model, cpu, (3, 32, 32), "fp32") is False
    assert resolve("auto", nn.Linear(2, 2), cpu, (2,), "fp32") is False  # no convolutions


def test_probe_timing_leaves_the_model_untouched():
    backbone = make_tiny_backbone()
    backbone.train()
    before = weights(backbone)
    images = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    precision_module.train_step_seconds(backbone, images, "bf16", True, steps=1)
    assert_same_weights(before, weights(backbone))
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_data_with_other_class_count_than_the_head_is_refused(tmp_path: Path) -> None:
    from finetune import ImageFolderData
    from tests.conftest import make_named_tree as make_tree

    data = ImageFolderData(make_tree(tmp_path, n_train=2, n_test=1), image_size=16,
                           val_split=0.0, num_workers=0, progress=False)
    trainer = Trainer(make_tiny_backbone(num_classes=2), LastLayerOnly(), FP32)
    with pytest.raises(ValueError, match=r"data has 3 classes \(cat, dog, owl\).*num_classes=3"):
        trainer.fit(data.train_loader())


def test_malloc_tuning_is_scoped_to_cpu_fit_and_reported(monkeypatch) -> None:
    import finetune.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(trainer_module, "restore_malloc_defaults",
                        lambda: calls.append("restore") or True)
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), FP32)
    trainer.fit(make_loader(8))
    assert calls == ["keep", "restore"] and trainer.state.malloc_tuned is True
    trainer.evaluate(make_loader(8))  # evaluation alone never tunes the allocator
    Trainer(make_tiny_backbone(), LastLayerOnly(), FP32).evaluate(make_loader(8))
    assert calls == ["keep", "restore"]
    off = Trainer(make_tiny_backbone(), LastLayerOnly(),
                  attrs.evolve(FP32, keep_freed_memory=False, epochs=1))
    off.fit(make_loader(8))
    assert calls == ["keep", "restore"] and off.state.malloc_tuned is False


def test_evaluate_alone_runs_no_speed_probe(monkeypatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision_module, "_CACHE", {})

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluate() timed training steps")

    monkeypatch.setattr(precision_module, "probe_precision", no_probe)
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), attrs.evolve(FP32, precision="auto"))
    report = trainer.evaluate(make_loader(8))
    assert trainer.state.precision == "fp32" and report.num_samples == 8


def test_precision_verdict_is_kept_per_model_structure_not_name(monkeypatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision_module, "_CACHE", {})
    probed = []

    def probe(model: nn.Module, images: torch.Tensor, channels_last: bool):
        probed.append(model)
        return ("bf16" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "fp32"), {}

    monkeypatch.setattr(precision_module, "probe_precision", probe)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 3))
    verdicts = [
        precision_module.resolve_precision(
            "auto", Backbone.from_module(model, head="3", groups=[("body", r"^[0-2]\.")],
                                         num_classes=3, name="custom"),
            torch.device("cpu"), (3, 8, 8), channels_last=False)
        for model in (conv, mlp, conv)
    ]
    assert verdicts == ["bf16", "fp32", "bf16"] and len(probed) == 2  # the third reuses


def test_keep_freed_memory_applies_on_glibc() -> None:
    import platform

    from finetune.runtime.memory import keep_freed_memory, restore_malloc_defaults

    try:
        applied = keep_freed_memory()
        assert applied == (platform.libc_ver()[0] == "glibc")
    finally:  # process-wide: the tests after this one run with glibc's defaults again
        restore_malloc_defaults()


def test_the_trainer_holds_the_strategys_decision_and_the_backbone_follows_it():
    backbone = make_tiny_backbone()
    before = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    decision = FreezeFraction(0.5).decide(backbone)
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == before
    trainer = Trainer(backbone, FreezeFraction(0.5), FP32)
    trainer.fit(make_loader())
    assert trainer.freeze is backbone.freeze_state
    assert dict(trainer.freeze.trainable) == dict(decision.trainable)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(backbone.model.named_parameters())
    assert held == {id(named[n]) for n in trainer.freeze.trainable}
    assert backbone.frozen_norm_layers == trainer.freeze.frozen_norm_layers


def test_a_trained_model_evaluates_as_it_is_without_a_strategy():
    backbone = make_tiny_backbone()
    Trainer(backbone, LastLayerOnly(), FP32).fit(make_loader())
    flags = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    state, frozen = backbone.freeze_state, backbone.frozen_norm_layers
    loader = make_loader(n=16, seed=1, shuffle=False)
    report = Trainer(backbone, None, FP32).evaluate(loader)
    assert report.accuracy == Trainer(backbone, LastLayerOnly(), FP32).evaluate(loader).accuracy
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == flags
    assert backbone.freeze_state is not None and backbone.frozen_norm_layers == frozen
    assert state.trainable == backbone.freeze_state.trainable
    with pytest.raises(ValueError, match="fit needs a strategy"):
        Trainer(backbone, None, FP32).fit(make_loader())
