"""FreezeStrategyCallback under the real Lightning Trainer, on CPU, with a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, FreezeAllBut, GradualUnfreeze
from finetune.errors import FinetuneError
from finetune.integrations.lightning import FreezeStrategyCallback
from tests.conftest import make_tiny_backbone


class LitClassifier(pl.LightningModule):
    """What a Lightning user writes: the optimizer over all parameters, SGD with momentum and
    weight decay — the settings that move 'frozen' weights when the optimizer holds them."""

    def __init__(self, backbone: Backbone, scheduler: str | None = None) -> None:
        super().__init__()
        self.backbone, self.scheduler = backbone, scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.backbone(images), labels)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        if self.scheduler == "step":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]
        if self.scheduler == "onecycle":
            return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1,
                                                                     total_steps=100)]
        return optimizer


class GroupRecorder(pl.Callback):
    """Which group names the optimizer holds, and the lrs, at the start of each epoch."""

    def __init__(self) -> None:
        self.groups: list[list[tuple[str, float]]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.groups.append([(g.get("name", "?"), g["lr"])
                            for g in trainer.optimizers[0].param_groups])


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], epochs: int,
        root: Path | None = None, ckpt_path: str | None = None) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks,
                         logger=False, enable_checkpointing=root is not None,
                         default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def snapshot(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def test_frozen_weights_and_batchnorm_statistics_stay_bit_identical() -> None:
    backbone = make_tiny_backbone()
    before = snapshot(backbone)
    callback = FreezeStrategyCallback(FreezeAllBut(groups=("block2",)))
    trainer = fit(LitClassifier(backbone), [callback], epochs=2)
    after = snapshot(backbone)
    frozen = [k for k in before if k.startswith(("stem.", "block1."))]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:  # weights, biases, running_mean/var, num_batches_tracked
        assert torch.equal(before[key], after[key]), key
    for key in ("block2.0.weight", "block2.1.running_mean", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith(("block2.", "fc."))
                         and not n.endswith(("running_mean", "running_var", "tracked"))}
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in backbone.parameters() if p.requires_grad}
    assert callback.report is not None and callback.report.frozen_norm_layers == 2


def test_without_the_callback_requires_grad_alone_lets_batchnorm_statistics_move() -> None:
    # The trap the callback exists for (Lightning#15062): the test above could fail.
    backbone = make_tiny_backbone()
    for name, parameter in backbone.model.named_parameters():
        parameter.requires_grad_(name.startswith(("block2.", "fc.")))
    before = snapshot(backbone)
    fit(LitClassifier(backbone), [], epochs=1)
    assert not torch.equal(before["stem.1.running_mean"], backbone.model.stem[1].running_mean)


def test_a_scheduled_strategy_gets_its_groups_each_epoch_and_keeps_optimizer_state() -> None:
    backbone = make_tiny_backbone()
    recorder = GroupRecorder()
    callback = FreezeStrategyCallback(GradualUnfreeze(every=1, lr_multiplier=0.1))
    trainer = fit(LitClassifier(backbone), [callback, recorder], epochs=3)
    names = [[name for name, _ in epoch] for epoch in recorder.groups]
    assert names == [["head"], ["block2", "head"], ["block1", "block2", "head"]]
    assert dict(recorder.groups[2]) == pytest.approx({"block1": 0.005, "block2": 0.005,
                                                      "head": 0.05})
    # The head's momentum buffer survived two rebuilds; frozen stem has no state at all.
    state = trainer.optimizers[0].state
    assert backbone.head.weight in state
    assert all(p not in state for p in backbone.model.stem.parameters())
    assert not any(p.requires_grad for p in backbone.model.stem.parameters())


def test_a_step_scheduler_follows_the_new_groups() -> None:
    recorder = GroupRecorder()
    callback = FreezeStrategyCallback(GradualUnfreeze(every=1))
    fit(LitClassifier(make_tiny_backbone(), scheduler="step"), [callback, recorder], epochs=3)
    # StepLR halves every epoch; groups unfrozen later start at the scheduled lr, not the base.
    assert recorder.groups[0] == [("head", pytest.approx(0.05))]
    assert recorder.groups[2] == [("block1", pytest.approx(0.0125)),
                                  ("block2", pytest.approx(0.0125)),
                                  ("head", pytest.approx(0.0125))]


def test_a_scheduler_with_its_own_group_settings_is_refused_with_the_fix() -> None:
    callback = FreezeStrategyCallback(FreezeAllBut(groups=("block2",)))
    with pytest.raises(FinetuneError, match=r"callback\.param_groups"):
        fit(LitClassifier(make_tiny_backbone(), scheduler="onecycle"), [callback], epochs=1)


def test_resume_from_a_lightning_checkpoint_restores_the_saved_group_layout(
        tmp_path: Path) -> None:
    backbone = make_tiny_backbone()
    fit(LitClassifier(backbone), [FreezeStrategyCallback(GradualUnfreeze(every=1))], epochs=2,
        root=tmp_path)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    recorder = GroupRecorder()
    resumed = LitClassifier(make_tiny_backbone(seed=1))
    fit(resumed, [FreezeStrategyCallback(GradualUnfreeze(every=1)), recorder], epochs=3,
        ckpt_path=str(checkpoint))
    assert [[n for n, _ in epoch] for epoch in recorder.groups] == [
        ["block1", "block2", "head"]]
    assert torch.equal(resumed.backbone.model.stem[0].weight, backbone.model.stem[0].weight)


def test_a_module_with_two_backbones_needs_the_attribute_named() -> None:
    class Two(LitClassifier):
        def __init__(self) -> None:
            super().__init__(make_tiny_backbone())
            self.teacher = make_tiny_backbone(seed=1)

    with pytest.raises(FinetuneError, match="backbone='attribute_name'"):
        fit(Two(), [FreezeStrategyCallback(FreezeAllBut(groups=("block2",)))], epochs=1)
    module = Two()
    callback = FreezeStrategyCallback(FreezeAllBut(groups=("block2",)), backbone="backbone")
    fit(module, [callback], epochs=1)
    assert not module.backbone.model.stem[0].weight.requires_grad
    assert module.teacher.model.stem[0].weight.requires_grad  # untouched, trained as "other"
