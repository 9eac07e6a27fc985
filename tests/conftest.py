"""Shared fixtures: a tiny CPU backbone with real groups and BatchNorm, and random data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.core.backbone import Backbone
from finetune.data.preprocessing import Preprocessing

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_GROUPS = (("stem", r"^stem\."), ("block1", r"^block1\."), ("block2", r"^block2\."))


class TinyNet(nn.Module):
    """Conv-BN stem, two conv-BN blocks, pooled linear classifier: ~3k parameters."""

    def __init__(self, num_outputs: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                    nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                                    nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block2(self.block1(self.stem(x)))).flatten(1))


def make_tiny_backbone(num_classes: int = 3, seed: int = 0, image_size: int = 32) -> Backbone:
    torch.manual_seed(seed)
    return Backbone.from_module(
        TinyNet(),
        head="fc",
        groups=TINY_GROUPS,
        num_classes=num_classes,
        name="tinynet",
        preprocessing=Preprocessing(resize_size=image_size, crop_size=image_size),
    )


@pytest.fixture
def tiny_backbone() -> Backbone:
    return make_tiny_backbone()


@pytest.fixture
def random_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 3, 32, 32, generator=generator),
         torch.randint(0, 3, (8,), generator=generator))
        for _ in range(4)
    ]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """wandb in offline mode writing under tmp_path, with no API key and no network."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb.teardown()  # wandb reads its environment once per process; make it read this one
    yield tmp_path
    wandb.finish()  # never leave a run open for the next test, even when this one failed


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not present at {SHARED_DATA} (see shared/data/README.md)")
    return SHARED_DATA
