"""The GPU precision policy, decided from the compute capability (tested on the CPU), fp16
with its gradient scaler, the scaler in checkpoints, and pinned loaders for CUDA."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from finetune.callbacks import Checkpoint
from finetune.data import ImageFolderData
from finetune.runtime import precision as precision_module
from finetune.runtime.precision import autocast, cuda_precision, resolve_precision
from finetune.strategies import FullUnfreeze
from finetune.train.checkpoint import load_checkpoint, save_checkpoint
from finetune.train.trainer import Trainer
from tests.conftest import make_loader, make_tiny_backbone, make_tree
from tests.test_trainer import FP32, assert_same_weights, weights


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 0), "fp16"),  # P100
    ((7, 0), "fp16"),  # V100
    ((7, 5), "fp16"),  # T4: is_bf16_supported() may say yes, but bf16 is emulated there
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # RTX 30xx
    ((9, 0), "bf16"),  # H100
])
def test_cuda_auto_precision_follows_the_compute_capability(capability, expected):
    assert cuda_precision(capability) == expected


def test_auto_on_cuda_asks_the_capability_not_is_bf16_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    model = make_tiny_backbone()
    assert resolve_precision("auto", model, torch.device("cuda"), (3, 32, 32), False) == "fp16"
    assert resolve_precision("fp16", model, torch.device("cpu"), (3, 32, 32), False) == "fp16"


def test_fp16_autocast_computes_in_half_precision():
    layer = torch.nn.Linear(4, 2)
    with autocast(torch.device("cpu"), "fp16"):
        assert layer(torch.randn(3, 4)).dtype == torch.float16
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(torch.randn(3, 4)).dtype == torch.float32


def test_fp16_fit_keeps_its_scaler_in_checkpoints_and_resumes_exactly(tmp_path: Path):
    config = attrs.evolve(FP32, precision="fp16", epochs=2, max_grad_norm=1.0, lr=1e-3)
    straight = make_tiny_backbone()
    trainer = Trainer(straight, FullUnfreeze(), config)
    trainer.fit(make_loader())
    assert trainer.state.precision == "fp16" and trainer.step.scaler is not None

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    Trainer(make_tiny_backbone(), FullUnfreeze(), attrs.evolve(config, epochs=1),
            callbacks=[checkpoint]).fit(make_loader())
    saved = load_checkpoint(checkpoint.last_path)
    assert saved["scaler"]["scale"] > 0
    saved["scaler"]["scale"] = 1024.0  # the restored scale is the one used next
    save_checkpoint(saved, tmp_path / "edited.pt")
    resumed = Trainer(make_tiny_backbone(seed=3), FullUnfreeze(), config)
    resumed.fit(make_loader(), resume=tmp_path / "edited.pt")
    assert resumed.step.scaler.get_scale() <= 1024.0

    again = Trainer(make_tiny_backbone(seed=3), FullUnfreeze(), config)
    again.fit(make_loader(), resume=checkpoint.last_path)
    assert_same_weights(weights(straight), weights(again.backbone))


def test_checkpoints_without_scaler_state_still_load(tmp_path: Path):
    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    config = attrs.evolve(FP32, precision="fp16", epochs=1)
    Trainer(make_tiny_backbone(), FullUnfreeze(), config, callbacks=[checkpoint]).fit(
        make_loader())
    older = load_checkpoint(checkpoint.last_path)
    del older["scaler"]  # as written before the scaler existed
    save_checkpoint(older, tmp_path / "older.pt")
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(), attrs.evolve(config, epochs=2))
    assert len(trainer.fit(make_loader(), resume=tmp_path / "older.pt")) == 2


def test_loaders_pin_memory_when_cuda_is_there(tmp_path: Path, monkeypatch):
    root = make_tree(tmp_path / "tree", n_train=4, n_test=1)
    kwargs = {"batch_size": 2, "num_workers": 0, "progress": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ImageFolderData(root, **kwargs).pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = ImageFolderData(root, **kwargs)
    assert not data.pin_memory and not data.train_loader().pin_memory
    assert ImageFolderData(root, pin_memory=True, **kwargs).train_loader().pin_memory


def test_cpu_auto_never_picks_fp16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    model = make_tiny_backbone()
    assert resolve_precision("auto", model, torch.device("cpu"), (3, 32, 32), False) == "fp32"
