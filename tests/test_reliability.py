"""Probes a hostile file or an unlucky user would run: each test here failed before its fix.

docs/reliability.md lists the promise each one backs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, FreezeFraction, FreezeStrategy, LastLayerOnly, TrainConfig, Trainer
from finetune.core.zoo import build_backbone
from finetune.errors import ArchitectureError
from tests.test_cli import FAST, TINY, run
from tests.test_functional import make_tree

HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef make(n):\n    pass\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", classes=3, n_train=4, n_test=2, size=40)


def _train(tree: Path, runs: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    code, out, err = run(["train", "--data", str(tree), "--backbone", TINY, "--batch-size", "4",
                          "--epochs", "1", "--checkpoint-dir", str(runs), *FAST, *extra], capsys)
    assert code == 0, err
    return out


# -- 1: a run folder is data, never code ----------------------------------------------------
def test_evaluate_never_imports_a_factory_named_in_run_json(tree, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    _train(tree, runs, capsys)
    code, _, err = run(["evaluate", "--checkpoint", str(runs), *FAST], capsys)
    assert code == 2 and "never imports code" in err and f"--backbone {TINY}" in err
    code, out, err = run(["evaluate", "--checkpoint", str(runs), "--backbone", TINY, *FAST],
                         capsys)
    assert code == 0 and "test set" in out, err  # named by the user: imported

    marker = tmp_path / "imported"
    (tmp_path / "hostile_factory.py").write_text(HOSTILE.format(marker=str(marker)))
    record = json.loads((runs / "run.json").read_text())
    (runs / "run.json").write_text(json.dumps({**record, "backbone": "hostile_factory:make"}))
    monkeypatch.chdir(tmp_path)  # the hostile module lies in the working directory
    code, _, err = run(["evaluate", "--checkpoint", str(runs), *FAST], capsys)
    assert code == 2 and "--backbone hostile_factory:make" in err
    assert not marker.exists()


def test_factories_are_not_imported_from_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "hostile_factory.py").write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArchitectureError, match="PYTHONPATH"):
        build_backbone("hostile_factory:make", 3)
    assert not marker.exists() and str(tmp_path) not in sys.path
    with pytest.raises(ArchitectureError, match="import path"):
        build_backbone(TINY, 3, allow_import=False)


# -- 2: the on-disk activation cache under channels_last ------------------------------------
@pytest.mark.parametrize("strategy", [LastLayerOnly(), FreezeFraction(0.5)],
                         ids=["pooled", "4d-activations"])
def test_spill_to_disk_under_channels_last_trains_as_the_plain_loop(
    strategy: FreezeStrategy, tmp_path: Path
) -> None:
    def fit(**cache: object) -> Trainer:
        torch.manual_seed(0)
        backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        train = DataLoader(TensorDataset(images, torch.arange(8) % 3), batch_size=4)
        config = TrainConfig(epochs=2, lr=1e-2, seed=0, precision="fp32",
                             channels_last=True, **cache)
        trainer = Trainer(backbone, strategy, config)
        trainer.fit(train)
        return trainer

    plain = fit(feature_cache="off")
    spilled = fit(feature_cache="on", cache_memory_gb=0, cache_dir=str(tmp_path))
    assert spilled.state.channels_last and spilled.state.cached_prefix is not None
    assert list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.json"))
    for (name, a), b in zip(plain.backbone.state_dict().items(),
                            spilled.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
