"""argparse types and the training-recipe options of `finetune train`: each type converts
and checks, naming what it expected, so a bad value is a usage error, not a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from finetune.data.decoded import physical_memory
from finetune.data.transforms import AUGMENTATIONS, DEFAULT_CROP_SCALE
from finetune.errors import ArchitectureError
from finetune.model.zoo import check_backbone_name
from finetune.strategies import FreezeStrategy, parse_strategy
from finetune.train.config import SCHEDULES, TrainConfig
from finetune.train.range_test import MIN_STEPS
from finetune.tuning import parse_grid


def strategy_argument(spec: str) -> FreezeStrategy:
    """argparse `type` for --strategy: `finetune.parse_strategy`, errors as usage errors."""
    try:
        return parse_strategy(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (see `finetune strategies`)") from None


def backbone_name(text: str) -> str:
    try:
        return check_backbone_name(text)
    except ArchitectureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def checked_number(convert: Callable[[str], Any], accept: Callable[[Any], bool],
                   wanted: str) -> Callable[[str], Any]:
    """An argparse `type` that converts, then checks, naming what it expected either way
    (also used by `benchmarks.compare`)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got '{text}'") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


positive_int = checked_number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked_number(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = checked_number(float, lambda v: math.isfinite(v) and v > 0,
                                "a finite number > 0")
non_negative_float = checked_number(float, lambda v: math.isfinite(v) and v >= 0,
                                    "a finite number >= 0")
val_fraction = checked_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
range_test_steps = checked_number(int, lambda v: v >= MIN_STEPS,
                                  f"an integer ≥ {MIN_STEPS} (a suggestion needs a slope on "
                                  "each side of a point)")


def lr_argument(text: str) -> float | str:
    """`--lr`: a positive number, or `auto` (chosen on validation by `finetune.tuning`)."""
    return "auto" if text == "auto" else positive_float(text)


def lr_grid_argument(text: str) -> tuple[float, ...]:
    """`--lr-grid`: learning rates separated by commas."""
    try:
        return parse_grid(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# Training holds at least this many copies of a batch's fp32 pixels at once (the batch, the
# first layers' activations and their gradients); ResNet50 holds ~210 (4.1 GB peak at batch
# 32, 224 px), so this is a floor, not an estimate.
MIN_BATCH_COPIES = 10


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


def channels_last_argument(text: str) -> str | bool:
    """--channels-last: auto, or on/off to pin the memory layout."""
    choices: dict[str, str | bool] = {"auto": "auto", "on": True, "off": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got '{text}'")
    return choices[text.lower()]


def device_argument(text: str) -> str:
    try:
        TrainConfig(device=text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def warmup_argument(text: str) -> int | float:
    """--warmup: optimizer steps (an integer) or a share of the run (a number in [0, 1))."""
    try:
        value: int | float = int(text) if text.strip().lstrip("+").isdigit() else float(text)
        TrainConfig(warmup=value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected optimizer steps (an integer >= 0) or a share of the run (a number in "
            f"[0, 1)), got '{text}'") from None
    return value


smoothing = checked_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
ema_decay = checked_number(float, lambda v: 0 < v < 1, "a decay in (0, 1), e.g. 0.999")
BALANCE_CHOICES = ("none", "sampler", "loss")


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


def augment_argument(text: str) -> str:
    """--augment: a policy name; on/off (and the old bare --augment) mean flip/none."""
    value = {"on": "flip", "off": "none", "true": "flip", "false": "none"}.get(text.lower(),
                                                                            text.lower())
    if value not in AUGMENTATIONS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AUGMENTATIONS)}, got "
                                         f"'{text}'")
    return value


def add_augment_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--augment POLICY (bare: flip), --no-augment, --crop-scale, --balance (train and
    benchmarks.compare; `default` None leaves it to a preset)."""
    parser.add_argument("--augment", type=augment_argument, nargs="?", const="flip",
                        default=default, metavar="{" + ",".join(AUGMENTATIONS) + "}",
                        help="training-image augmentation: none; flip (random resized crops "
                             "and flips); trivial, randaugment or autoaugment (torchvision's "
                             "policies after the crop and flip). A bare --augment is flip "
                             f"(default: {default or 'the preset'})")
    parser.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                        help="the same as --augment none")
    parser.add_argument("--crop-scale", type=crop_scale_argument, default=DEFAULT_CROP_SCALE,
                        metavar="MIN[,MAX]",
                        help="random resized crops take this share of the image area "
                             "(default: 0.08,1)")
    parser.add_argument("--balance", choices=BALANCE_CHOICES, default="none",
                        help="imbalanced classes: sampler draws every class equally often; "
                             "loss weights cross-entropy by inverse class frequency "
                             "(default: none)")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--schedule, --warmup, --accumulate, --label-smoothing, --max-grad-norm, --ema,
    --mixup, --cutmix."""
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="learning rate per optimizer step: constant, or linear / cosine "
                             "decay to 0, or one-cycle (default: constant)")
    parser.add_argument("--warmup", type=warmup_argument, default=None, metavar="N|SHARE",
                        help="linear warm-up over N optimizer steps, or a share of the run "
                             "such as 0.1 (default: none; one-cycle: 0.3)")
    parser.add_argument("--accumulate", type=positive_int, default=1, metavar="K",
                        help="one optimizer step per K batches: an effective batch of K x "
                             "--batch-size (default: 1)")
    parser.add_argument("--label-smoothing", type=smoothing, default=0.0,
                        help="cross-entropy label smoothing, e.g. 0.1 (default: 0)")
    parser.add_argument("--max-grad-norm", type=positive_float, default=None,
                        help="clip the gradient norm to this (default: no clipping)")
    add_mixing_arguments(parser)


def add_mixing_arguments(parser: argparse.ArgumentParser) -> None:
    """--ema, --mixup, --cutmix (train and benchmarks.compare)."""
    parser.add_argument("--ema", type=ema_decay, default=None, metavar="DECAY",
                        help="validate, test and save a moving average of the weights, e.g. "
                             "0.999 (decay warmed up as timm does; default: off)")
    parser.add_argument("--mixup", type=non_negative_float, default=0.0, metavar="ALPHA",
                        help="MixUp training batches, Beta(ALPHA, ALPHA), e.g. 0.2 (default: "
                             "off); the training pass then runs the whole model")
    parser.add_argument("--cutmix", type=non_negative_float, default=0.0, metavar="ALPHA",
                        help="CutMix training batches, e.g. 1.0 (default: off); with --mixup, "
                             "one of the two per batch")


def recipe_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields `add_recipe_arguments` (and --balance loss) set."""
    return {"schedule": args.schedule, "warmup": args.warmup,
            "accumulate_steps": args.accumulate, "label_smoothing": args.label_smoothing,
            "max_grad_norm": args.max_grad_norm, "ema_decay": args.ema,
            "mixup": args.mixup, "cutmix": args.cutmix,
            "class_weights": "balanced" if args.balance == "loss" else "none"}


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ImageFolderData arguments `add_augment_arguments` set."""
    return {"data_augmentation": args.augment, "crop_scale": args.crop_scale,
            "balanced_sampling": args.balance == "sampler"}
