"""How a run takes its images, declared once (`finetune.settings`): the validation split, a
per-class cap, the crop size, the batch, augmentation and class balance. `finetune train`,
`lr-find`, `advise`, `evaluate` and `finetune compare` derive their data flags from here, and
`DataConfig.loader_options()` is what `ImageFolderData` takes."""

from __future__ import annotations

import argparse
from typing import Any

import attrs
from attrs import validators as v

from finetune.data.decoded import physical_memory
from finetune.data.defaults import AUGMENT, VAL_SPLIT
from finetune.data.transforms import AUGMENTATIONS, DEFAULT_CROP_SCALE, augmentation
from finetune.data.transforms import crop_scale as checked_crop_scale
from finetune.settings import non_negative_int, optional, positive_int, setting, unit_interval

BALANCE_CHOICES = ("none", "sampler", "loss")
EVERY_DATA_COMMAND = frozenset({"train", "lr-find", "compare", "advise"})
LOADING_COMMANDS = EVERY_DATA_COMMAND | {"evaluate"}
# Training holds at least this many copies of a batch's fp32 pixels at once (the batch, the
# first layers' activations and their gradients); ResNet50 holds ~210 (4.1 GB peak at batch
# 32, 224 px), so this is a floor, not an estimate.
MIN_BATCH_COPIES = 10


def augment_argument(text: str) -> str:
    """--augment: a policy name; on/off (and the old bare --augment) mean flip/none."""
    value = {"on": "flip", "off": "none", "true": "flip", "false": "none"}.get(text.lower(),
                                                                            text.lower())
    if value not in AUGMENTATIONS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AUGMENTATIONS)}, got "
                                         f"'{text}'")
    return value


def crop_scale_argument(text: str) -> tuple[float, float]:
    """--crop-scale: MIN or MIN,MAX shares of the image area for random resized crops."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not 0 < values[0] <= values[-1] <= 1:
        raise argparse.ArgumentTypeError(
            f"expected MIN or MIN,MAX with 0 < MIN <= MAX <= 1, got '{text}'")
    return values[0], values[-1] if len(values) == 2 else 1.0


def check_image_fits(image_size: int | None, batch_size: int) -> None:
    """Refuse, before any data or model is loaded, an image size whose training batch cannot
    fit in this machine's memory (`--image-size 100000` would fail with a MemoryError or
    swap for an hour)."""
    ram = physical_memory()
    if image_size is None or ram is None:
        return
    needed = MIN_BATCH_COPIES * batch_size * 3 * image_size**2 * 4
    if needed > ram:
        raise ValueError(
            f"--image-size {image_size} with --batch-size {batch_size} needs at least "
            f"{needed / 2**30:,.0f} GiB to train (a batch of {image_size}x{image_size} images "
            f"and its first activations), but this machine has {ram / 2**30:.0f} GiB; use a "
            "smaller --image-size (the weights' own is 224 or so) or --batch-size.")


def _optional_positive(_: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{attribute.name} must be a positive integer or None (got {value!r})")


@attrs.frozen(kw_only=True)
class DataConfig:
    """The data side of a run. `balance` is one setting with two uses: "sampler" draws every
    class equally often (the loader), "loss" weights the cross-entropy (`class_weights`)."""

    val_split: float = setting(
        VAL_SPLIT, flag="--val-split", parse=unit_interval, commands=EVERY_DATA_COMMAND,
        help="share of each class's training images held out for validation; 0 for none",
        validator=[v.instance_of((int, float)), v.ge(0), v.lt(1)])
    image_size: int | None = setting(
        None, flag="--image-size", parse=optional(positive_int), commands=EVERY_DATA_COMMAND,
        help="train and test at this crop size; none: the weights' own",
        validator=_optional_positive)
    train_per_class: int | None = setting(
        None, flag="--train-per-class", parse=optional(positive_int),
        commands=EVERY_DATA_COMMAND, metavar="N",
        help="use at most N images of each class (before the val split); none: all",
        validator=_optional_positive)
    batch_size: int = setting(32, flag="--batch-size", parse=positive_int,
                              commands=LOADING_COMMANDS, help="images per batch (per process)",
                              validator=[v.instance_of(int), v.ge(1)])
    workers: int | None = setting(
        None, flag="--workers", parse=optional(non_negative_int), resume=False,
        commands=LOADING_COMMANDS, help="data loader worker processes; none: 1 on ≥ 2 cores",
        validator=v.optional(v.ge(0)))
    augment: str = setting(
        AUGMENT, flag="--augment", parse=augment_argument, const="flip",
        negation=("--no-augment", "none"),
        metavar="{" + ",".join(AUGMENTATIONS) + "}", converter=augmentation,
        help="training-image augmentation: none; flip (random resized crops and flips); "
             "trivial, randaugment or autoaugment (torchvision's policies after the crop and "
             "flip). A bare --augment is flip")
    crop_scale: tuple[float, float] = setting(
        DEFAULT_CROP_SCALE, flag="--crop-scale", parse=crop_scale_argument, metavar="MIN[,MAX]",
        converter=checked_crop_scale, help="random resized crops take this share of the image area")
    balance: str = setting(
        "none", flag="--balance", choices=BALANCE_CHOICES, validator=v.in_(BALANCE_CHOICES),
        help="imbalanced classes: sampler draws every class equally often; loss weights "
             "cross-entropy by inverse class frequency")

    def __attrs_post_init__(self) -> None:
        check_image_fits(self.image_size, self.batch_size)

    @property
    def class_weights(self) -> str:
        """`TrainConfig.class_weights` for this balance."""
        return "balanced" if self.balance == "loss" else "none"

    def loader_options(self) -> dict[str, Any]:
        """The `ImageFolderData` arguments these settings give."""
        return {"batch_size": self.batch_size, "image_size": self.image_size,
                "num_workers": self.workers, "data_augmentation": self.augment,
                "crop_scale": self.crop_scale, "balanced_sampling": self.balance == "sampler"}

    def split_options(self) -> dict[str, Any]:
        """The `ImageSplits.scan` arguments these settings give."""
        return {"val_split": self.val_split, "train_per_class": self.train_per_class}
