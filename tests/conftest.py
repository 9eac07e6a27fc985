"""Shared fixtures and helpers: a tiny CPU backbone with real groups and BatchNorm, random
batches and loaders, small image trees on disk, and running the CLI in-process."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.data.preprocessing import Preprocessing
from finetune.model.backbone import Backbone

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


@pytest.fixture(autouse=True)
def private_cache_root(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cache root ($FINETUNE_CACHE): stored probe verdicts and
    resized copies of one test (or of the user's own runs) never decide another's."""
    root = tmp_path_factory.mktemp("finetune-cache")
    monkeypatch.setenv("FINETUNE_CACHE", str(root))
    return root


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


# -- helpers shared by several test modules ------------------------------------------------------
TINY = "tests.conftest:make_tiny_backbone"
FAST = ["--workers", "0", "--precision", "fp32"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr), whether it returns or exits."""
    from finetune.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def make_loader(n: int = 32, seed: int = 0, shuffle: bool = True, num_classes: int = 3
                ) -> DataLoader:
    """Random images whose class shifts the mean, so a model can learn something."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    images = torch.randn(n, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1) * 0.5
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(123) if shuffle else None)


def make_tree(root: Path, classes: int = 3, n_train: int = 5, n_test: int = 2,
              size: int = 24) -> Path:
    """`root/train/<class>/` and `root/val/<class>/`, each class a distinct flat colour with a
    little texture, so a model can separate them."""
    for split, count in (("train", n_train), ("val", n_test)):
        for c in range(classes):
            colour = ((67 * c) % 256, (255 - 41 * c) % 256, (113 * c + 40) % 256)
            for i in range(count):
                image = Image.new("RGB", (size, size), colour)
                image.putpixel((i % size, (3 * i) % size), (255, 255, 255))
                path = root / split / f"class{c}" / f"img{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
    return root


COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}


def write_image(path: Path, colour=(128, 128, 128), size=(48, 40), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    # a little texture so crops and flips change pixels
    for x in range(0, size[0], 7):
        image.putpixel((x, x % size[1]), (255, 255, 255))
    image.convert(mode).save(path)
    return path


def make_named_tree(root: Path, n_train: int = 10, n_test: int = 3, size=(48, 40),
                    classes=("cat", "dog", "owl")) -> Path:
    """`root/train/<name>/` and `root/val/<name>/` of textured flat-colour images."""
    for split, count in (("train", n_train), ("val", n_test)):
        for name in classes:
            for i in range(count):
                write_image(root / split / name / f"{name}{i:03d}.jpg", COLOURS[name], size)
    return root


def finish_all(processes: list[subprocess.Popen], timeout: float, what: str
               ) -> list[subprocess.CompletedProcess]:
    """Wait for processes started together (launchers, workers); each must exit 0. Past the
    deadline all are killed and the test fails, rather than hang on a broken collective."""
    done = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"{what} did not finish in {timeout:.0f} s")
        assert process.returncode == 0, err[-3000:]
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done
