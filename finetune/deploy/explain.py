"""What a model looked at: class activation maps (Grad-CAM) of its last convolution, drawn over
the images — with the `grad-cam` package (the `[explain]` extra; `pytorch_grad_cam`), not CAM
code of our own.

`explain(model, pixels, preprocessing, classes)` returns one map per image (H × W in [0, 1]) for
each image's class; `overlay_grid(...)` draws the images beside their maps, captioned, as one
PIL image: what `finetune evaluate --explain` writes for the highest-loss images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import EvalTransform

MISSING = ("--explain needs the grad-cam package: pip install 'finetune[explain]' (it brings "
           "pytorch_grad_cam and OpenCV)")


def last_convolution(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the last 2-D convolution (the deepest spatial features)."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise ValueError(f"{type(model).__name__} has no 2-D convolution for a class "
                         "activation map (a vision transformer's maps need a reshape this "
                         "does not do)")
    return convolutions[-1]


def explain(model: nn.Module, pixels: Sequence[np.ndarray], preprocessing: Preprocessing,
            classes: Sequence[int], layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps (N, H, W), each in [0, 1], of `model` for `classes[i]` on `pixels[i]`
    (uint8 H × W × 3 as the evaluation transform crops them)."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ImportError(MISSING) from None
    transform = EvalTransform(preprocessing)
    batch = torch.stack([transform.normalise(p) for p in pixels])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with GradCAM(model=model, target_layers=[layer or last_convolution(model)]) as cam:
            # the input carries the gradient, so frozen (or loaded, no-grad) weights give one
            maps = cam(input_tensor=batch.to(device).requires_grad_(True),
                       targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def overlay_grid(pixels: Sequence[np.ndarray], maps: np.ndarray, captions: Sequence[str],
                 cell: int = 200) -> Any:
    """Each image beside its map over it, captioned, two pairs a row."""
    from PIL import Image, ImageDraw, ImageFont
    from pytorch_grad_cam.utils.image import show_cam_on_image

    pairs_per_row = 2
    lines = max(1, -(-len(pixels) // pairs_per_row))
    caption = 16
    canvas = Image.new("RGB", (pairs_per_row * 2 * cell, lines * (cell + caption)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for index, (image, heat, text) in enumerate(zip(pixels, maps, captions, strict=True)):
        left = (index % pairs_per_row) * 2 * cell
        top = (index // pairs_per_row) * (cell + caption)
        shown = show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True)
        for offset, picture in ((0, image), (cell, shown)):
            tile = Image.fromarray(picture).resize((cell - 4, cell - 4))
            canvas.paste(tile, (left + offset + 2, top + caption))
        draw.text((left + 4, top + 2), text[:60], fill="black", font=font)
    return canvas
