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
MAX_SIDE = 4096  # px; a batch of larger images does not fit a machine's memory
_SIDE = [attrs.validators.instance_of(int), attrs.validators.ge(1), attrs.validators.le(MAX_SIDE)]


def _three_numbers(_: object, attribute: attrs.Attribute, value: tuple) -> None:
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in value):
        raise ValueError(f"'{attribute.name}' must be three numbers (R, G, B), got {value!r}")
    if attribute.name == "std" and min(value) <= 0:
        raise ValueError(f"'std' must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class Preprocessing:
    """What the weights expect of an image: resize the shorter side, centre-crop, normalise."""

    resize_size: int = attrs.field(default=256, validator=_SIDE)
    crop_size: int = attrs.field(default=224, validator=_SIDE)
    mean: tuple[float, float, float] = attrs.field(default=IMAGENET_MEAN, converter=tuple,
                                                   validator=_three_numbers)
    std: tuple[float, float, float] = attrs.field(default=IMAGENET_STD, converter=tuple,
                                                  validator=_three_numbers)
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


def preprocessing_from_record(record: object, source: str) -> Preprocessing:
    """The `Preprocessing` a run file, checkpoint or export description records, or a
    ValueError naming `source`, the field and what it holds: an edited file must not be
    served at 100000 px, nor fail with a TypeError that names nothing."""
    fields = {field.name for field in attrs.fields(Preprocessing)}
    if not isinstance(record, dict) or not set(record) <= fields:
        raise ValueError(f"{source}: 'preprocessing' must be an object of "
                         f"{', '.join(sorted(fields))} (got {record!r:.120}); restore it from "
                         "the run's run.json")
    try:
        return Preprocessing(**record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: preprocessing {_first_line(error)}; sizes are whole "
                         f"numbers from 1 to {MAX_SIDE} px, mean and std three numbers each"
                         ) from None


def _first_line(error: Exception) -> str:
    text = str(error.args[0] if error.args else error)
    return text.splitlines()[0][:200]
