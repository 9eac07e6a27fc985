"""Train and eval transforms built from a backbone's `Preprocessing`.

Random choices come from a `random.Random` seeded per sample (not torch's global RNG), so a
seed gives the same augmented batches whatever the number of loader workers. The automatic
policies are torchvision's (`transforms.v2`), which draw from torch's global RNG: each runs
under a forked RNG seeded from the sample's, so they are seeded the same way."""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.data.preprocessing import Preprocessing
from finetune.errors import DataError

AUGMENTATIONS = ("none", "flip", "trivial", "randaugment", "autoaugment")
# after the random resized crop and flip, with bilinear resampling for the geometric ops, as
# torchvision's classification reference (references/classification/presets.py) runs them
_BILINEAR = F.InterpolationMode.BILINEAR
_POLICIES = {
    "trivial": lambda: v2.TrivialAugmentWide(interpolation=_BILINEAR),
    "randaugment": lambda: v2.RandAugment(interpolation=_BILINEAR),
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET,
                                          interpolation=_BILINEAR),
}
DEFAULT_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's, as torchvision's ImageNet recipe

_INTERPOLATION = {
    "bilinear": F.InterpolationMode.BILINEAR,
    "bicubic": F.InterpolationMode.BICUBIC,
    "nearest": F.InterpolationMode.NEAREST,
}


def augmentation(value: bool | str) -> str:
    """The augmentation policy named by `value`: one of `AUGMENTATIONS`, or a bool (True is
    "flip": random resized crops and flips, False is "none")."""
    if isinstance(value, bool):
        return "flip" if value else "none"
    if value not in AUGMENTATIONS:
        raise DataError(f"augmentation must be one of {', '.join(AUGMENTATIONS)} (or True/False "
                        f"for flip/none), got {value!r}")
    return value


def crop_scale(value: float | tuple[float, float]) -> tuple[float, float]:
    """RandomResizedCrop's (min, max) share of the image area; a number is the min."""
    low, high = (value, 1.0) if isinstance(value, (int, float)) else tuple(value)
    if not 0.0 < low <= high <= 1.0:
        raise DataError(f"crop scale must satisfy 0 < min <= max <= 1 (a share of the image "
                        f"area), got {value!r}; torchvision's default is 0.08,1.0")
    return float(low), float(high)


def train_transform(preprocessing: Preprocessing, augment: bool | str = "flip",
                    scale: float | tuple[float, float] = DEFAULT_CROP_SCALE
                    ) -> EvalTransform | TrainTransform:
    """The training images' transform: `EvalTransform` for "none" (fixed images, which the
    activation cache may store), else a `TrainTransform` with that policy."""
    policy = augmentation(augment)
    if policy == "none":
        return EvalTransform(preprocessing)
    return TrainTransform(preprocessing, scale=crop_scale(scale), policy=policy)


def sized(preprocessing: Preprocessing, image_size: int | None) -> Preprocessing:
    """`preprocessing` trained at another crop size; the resize scales with it, so 160 px on
    a 256/224 backbone resizes to 183 px (the same crop fraction)."""
    if image_size is None:
        return preprocessing
    if not isinstance(image_size, int) or image_size < 8:
        raise DataError(f"image_size must be an integer >= 8 pixels, got {image_size!r}")
    resize = round(image_size * preprocessing.resize_size / preprocessing.crop_size)
    return attrs.evolve(preprocessing, resize_size=resize, crop_size=image_size)


@attrs.frozen
class EvalTransform:
    """Resize the shorter side, centre-crop, normalise: what the weights were trained with."""

    preprocessing: Preprocessing

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalise(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized, cropped image as uint8 (H, W, 3): what `DecodedImages` keeps."""
        p = self.preprocessing
        image = F.resize(image, [p.resize_size], interpolation=_INTERPOLATION[p.interpolation])
        return np.asarray(F.center_crop(image, [p.crop_size, p.crop_size]))

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        return _normalise(pixels, self.preprocessing)

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one image's `pixels`."""
        return 3 * self.preprocessing.crop_size ** 2


@attrs.frozen
class TrainTransform:
    """Random resized crop (scale 8–100% by default, aspect 3/4–4/3) and horizontal flip, as
    torchvision's ImageNet recipe; then `policy`'s automatic augmentation ("trivial",
    "randaugment", "autoaugment"; "flip" adds none), then normalise."""

    preprocessing: Preprocessing
    scale: tuple[float, float] = DEFAULT_CROP_SCALE
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    policy: str = attrs.field(default="flip", validator=attrs.validators.in_(AUGMENTATIONS[1:]))
    _auto: Any = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        maker = _POLICIES.get(self.policy)
        object.__setattr__(self, "_auto", maker() if maker else None)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random()
        p = self.preprocessing
        top, left, height, width = self.crop_box(image.width, image.height, rng)
        image = F.resized_crop(
            image, top, left, height, width, [p.crop_size, p.crop_size],
            interpolation=_INTERPOLATION[p.interpolation],
        )
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        if self._auto is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                image = self._auto(image)
        return _normalise(image, p)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width), torchvision's RandomResizedCrop.get_params."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def _normalise(image: Image.Image | np.ndarray, p: Preprocessing) -> torch.Tensor:
    """(x/255 - mean)/std as one numpy multiply-add: torch's intra-op threads would fight the
    model for the cores in the main process (6x slower there on a loaded 2-core machine)."""
    scale = np.float32(1 / 255) / np.asarray(p.std, dtype=np.float32)
    shift = np.asarray(p.mean, dtype=np.float32) / np.asarray(p.std, dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32) * scale - shift
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
