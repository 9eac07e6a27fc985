"""Grad-CAM through the `grad-cam` package (the `[explain]` extra): on a task where one patch
decides the class (its colour, anywhere in the image), the map lights that patch;
`finetune evaluate --explain` draws it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_grad_cam", reason="the [explain] extra (grad-cam) is not installed")

from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import EvalTransform
from finetune.deploy.explain import explain, last_convolution

SIZE = 32


def patch_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noise with one 8-pixel square anywhere: red for class 0, blue for class 1 — the
    square alone decides the class. Returns (pixels, labels, a mask of each square)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 120, (count, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, count)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for i, label in enumerate(labels):
        left, top = rng.integers(0, SIZE - 8, 2)
        pixels[i, top:top + 8, left:left + 8] = (240, 30, 30) if label == 0 else (30, 30, 240)
        masks[i, top:top + 8, left:left + 8] = True
    return pixels, labels, masks


def test_the_map_lights_the_patch_that_decides_the_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    preprocessing = Preprocessing(resize_size=SIZE, crop_size=SIZE, mean=(0.5, 0.5, 0.5),
                                  std=(0.5, 0.5, 0.5))
    transform = EvalTransform(preprocessing)
    pixels, labels, _ = patch_images(256, 0)
    images = torch.stack([transform.normalise(p) for p in pixels])
    targets = torch.as_tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
    test_pixels, test_labels, masks = patch_images(32, 1)
    with torch.no_grad():
        accuracy = (model(torch.stack([transform.normalise(p) for p in test_pixels]))
                    .argmax(1).numpy() == test_labels).mean()
    assert accuracy >= 0.9  # it learnt the patch's colour
    assert last_convolution(model) is model[2]
    maps = explain(model, list(test_pixels), preprocessing, list(test_labels))
    assert maps.shape == (32, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    on_patch = [m[mask].mean() > 2 * m[~mask].mean() for m, mask in zip(maps, masks,
                                                                       strict=True)]
    assert np.mean(on_patch) >= 0.9


def test_evaluate_explain_writes_the_maps_of_the_worst_images(tmp_path: Path) -> None:
    from finetune.cli import main
    from tests.conftest import TINY, make_tree

    data = make_tree(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", TINY, "--epochs", "1",
                 "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu",
                 "--precision", "fp32", "--strategy", "last-layer", "--checkpoint-dir",
                 str(run)]) == 0
    assert main(["evaluate", "--checkpoint", str(run), "--backbone", TINY, "--device", "cpu",
                 "--workers", "0", "--worst", "3", "--explain"]) == 0
    assert (run / "analysis-test" / "explained.png").stat().st_size > 0
