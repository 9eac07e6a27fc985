"""`Preprocessing`: what a model's weights expect of an image (resize, crop, mean/std).

It lives with the data because it is all the data layer needs to know of a model: loaders are
built from a `Preprocessing`, never from the model itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@attrs.frozen(kw_only=True)
class Preprocessing:
    """What the weights expect of an image: resize the shorter side, centre-crop, normalise."""

    resize_size: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    crop_size: int = attrs.field(default=224, validator=attrs.validators.ge(1))
    mean: tuple[float, float, float] = attrs.field(default=IMAGENET_MEAN, converter=tuple)
    std: tuple[float, float, float] = attrs.field(default=IMAGENET_STD, converter=tuple)
    interpolation: str = attrs.field(
        default="bilinear", validator=attrs.validators.in_(("bilinear", "bicubic", "nearest"))
    )


def preprocessing_from_weights(weights: torchvision.models.WeightsEnum) -> Preprocessing:
    """What torchvision weights expect, read from their own transforms."""
    transform = weights.transforms()
    return Preprocessing(
        resize_size=int(transform.resize_size[0]),
        crop_size=int(transform.crop_size[0]),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )
