"""Run configuration as frozen, validated attrs classes: a bad value fails when the config is
built, not an hour into training, and sweeps are `attrs.evolve(config, lr=...)`."""

from __future__ import annotations

import argparse
import math
import re
import warnings

import attrs
from attrs import validators as v

from finetune.data.config import DataConfig
from finetune.settings import (
    TRAINING_COMMANDS,
    checked_number,
    non_negative_float,
    optional,
    positive_float,
    positive_int,
    setting,
    unit_interval,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine", "one-cycle")  # finetune.train.schedules
FEATURE_CACHE_MODES = ("auto", "on", "off")
CLASS_WEIGHTS = ("none", "balanced")
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("val_loss", "val_accuracy")  # what early stopping watches (lower / higher wins)
STOPPING_COMMANDS = frozenset({"train", "compare"})
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _check_device(_: object, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {value!r}); 'auto' picks "
            "CUDA when present, else the CPU."
        )


def _check_channels_last(_: object, attribute: attrs.Attribute, value: object) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"channels_last must be 'auto', True or False (got {value!r})")


def _check_warmup(_: object, attribute: attrs.Attribute, value: object) -> None:
    ok = (value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
          or (isinstance(value, float) and 0.0 <= value < 1.0))
    if not ok:
        raise ValueError(
            f"warmup must be a number of optimizer steps (an int >= 0), a share of the run "
            f"(a float in [0, 1)) or None for the schedule's default (got {value!r})"
        )


# Past this the run is almost surely a typo (1e30 for 1e-3): Adam fine-tunes at 1e-5..1e-2,
# SGD rarely above 1.
LR_SANE_MAX = 10.0


def _check_lr(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a finite number > 0 (got {value!r})")
    if value > LR_SANE_MAX:
        warnings.warn(f"lr={value:g} is far above any learning rate that trains (fine-tuning "
                      "uses 1e-5 to 1e-2); training will likely diverge.", RuntimeWarning,
                      stacklevel=4)


def _check_ema(_: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"ema_decay must be in (0, 1), e.g. 0.999, or None for no moving "
                         f"average (got {value!r})")


def _positive_or_none(_: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number or None (got {value!r})")


# where a setting's flag appears (`finetune.settings`): advise fine-tunes at epochs and lr on a
# device; evaluate loads at a precision and layout; compare gives each row its own seed
WITH_ADVISE = TRAINING_COMMANDS | {"advise"}
RUNTIME_COMMANDS = WITH_ADVISE | {"evaluate"}
SEEDED_COMMANDS = frozenset({"train", "lr-find", "advise"})


def device_argument(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (the message TrainConfig gives)."""
    try:
        _check_device(None, None, text)  # type: ignore[arg-type]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def channels_last_argument(text: str) -> str | bool:
    """--channels-last: auto, or on/off to pin the memory layout."""
    choices: dict[str, str | bool] = {"auto": "auto", "on": True, "off": False,
                                      "true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got '{text}'")
    return choices[text.lower()]


def warmup_argument(text: str) -> int | float:
    """--warmup: optimizer steps (an integer) or a share of the run (a number in [0, 1))."""
    try:
        value: int | float = int(text) if text.strip().lstrip("+").isdigit() else float(text)
        _check_warmup(None, None, value)  # type: ignore[arg-type]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected optimizer steps (an integer >= 0) or a share of the run (a number in "
            f"[0, 1)), got '{text}'") from None
    return value


ema_decay_argument = checked_number(float, lambda v: 0 < v < 1, "a decay in (0, 1), e.g. 0.999")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """What one `Trainer.fit` run does. Defaults follow the reference setup (Adam, lr 1e-4,
    cross-entropy, 5 epochs); each field is a declared setting (`finetune.settings`: its
    flag, help and resume rule); `precision="auto"` and `channels_last="auto"` pick the fast
    path per model.

    - `seed`: seeds every RNG at fit start and again at each epoch start from (seed, epoch), so
      a run is repeatable on CPU and a resumed run shuffles exactly as an uninterrupted one.
      None leaves the RNGs alone.
    - `precision`: "fp32", "bf16" (autocast), or "auto" (bf16 only where a timed probe shows
      it is faster for this model on this device; see `finetune.runtime.precision`).
    - `precision`: also "fp16" (autocast with a gradient scaler); on CUDA "auto" is bf16 where
      the card computes it natively (compute capability >= 8.0), else fp16.
    - `max_grad_norm`: clip the gradient norm of the trainable parameters (after unscaling
      fp16 gradients); None does not clip.
    - `schedule` / `warmup`: the lr per optimizer step, as a multiplier on each group's lr
      (see `finetune.train.schedules`); `warmup` is steps (int) or a share of the run (float).
    - `accumulate_steps`: one optimizer step per this many batches (and at the end of an
      epoch for a remainder), each batch's loss weighted by its share of the step's images.
    - `label_smoothing`: for the default cross-entropy loss (a custom `loss=` is refused).
    - `ema_decay`: keep an exponential moving average of the trained weights (decay warmed up
      as timm does, `finetune.train.recipes.WeightAverage`); validation uses the average,
      and at the end of fit the backbone holds it. None: no average.
    - `mixup` / `cutmix`: Beta alphas of MixUp / CutMix on training batches (0: off; with
      both, one of the two per batch); the loss takes the mixed soft targets. They change the
      images, so the training pass never runs on cached activations.
    - `class_weights`: "balanced" weights the cross-entropy by inverse class frequency of the
      training data (validation loss stays unweighted).
    - `keep_freed_memory`: on the CPU with glibc, have malloc reuse freed memory instead of
      returning it to the kernel every step (fewer page faults; see `finetune.runtime.memory`).
      It is process-wide, so it holds for the length of `fit` only and is undone when fit
      returns; `TrainState.malloc_tuned` reports it. `evaluate` alone never applies it.
    - `feature_cache`: run a frozen prefix once per image and train the rest on its stored
      activations (see `finetune.cache.store`). "auto" caches when that is exact: the
      strategy freezes a prefix, the dataset is deterministic (no augmentation) and the
      activations fit `cache_memory_gb` (or spill to files in `activation_cache_dir`). "on"
      also caches datasets that do not declare themselves deterministic (you vouch for it);
      "off" never caches. (The data's `cache_dir` is another folder: where the resized copy
      of the images goes.)
    """

    epochs: int = setting(5, flag="--epochs", parse=positive_int, resume=False,
                          commands=WITH_ADVISE, help="passes over the training split",
                          validator=[v.instance_of(int), v.ge(1)])
    lr: float = setting(1e-4, flag="--lr", parse=positive_float, commands=WITH_ADVISE,
                        help="learning rate", converter=float, validator=_check_lr)
    optimizer: str = setting(
        "adam", flag="--optimizer", choices=OPTIMIZERS, validator=v.in_(OPTIMIZERS),
        help="adam (the reference), adamw (decoupled weight decay, most fine-tuning recipes) "
             "or sgd (with --momentum, --nesterov)")
    weight_decay: float = setting(
        0.0, flag="--weight-decay", parse=non_negative_float, converter=float,
        validator=v.ge(0.0), help="weight decay of the tensors that train, biases and norm "
                                  "layers excepted (timm's convention), e.g. 0.05 with adamw")
    decay_norm_and_bias: bool = setting(
        False, flag="--decay-norm-and-bias", validator=v.instance_of(bool),
        help="decay biases and norm layers' scale and shift too")
    momentum: float = setting(0.9, flag="--momentum", parse=unit_interval, converter=float,
                              validator=[v.ge(0.0), v.lt(1.0)], help="sgd's momentum")
    nesterov: bool = setting(False, flag="--nesterov", validator=v.instance_of(bool),
                             help="sgd with Nesterov momentum")
    seed: int | None = setting(0, flag="--seed", parse=int, commands=SEEDED_COMMANDS,
                               help="seeds the split, the new head, the shuffle and the "
                                    "augmentation", validator=v.optional(v.instance_of(int)))
    precision: str = setting(
        "auto", flag="--precision", choices=PRECISIONS, commands=RUNTIME_COMMANDS,
        help="auto: on CUDA bf16 where the card has it natively, else fp16; on the CPU bf16 "
             "only where measurably faster", validator=v.in_(PRECISIONS))
    device: str = setting("auto", flag="--device", parse=device_argument, resume=False,
                          commands=RUNTIME_COMMANDS, help="auto, cpu, cuda or cuda:N",
                          validator=_check_device)
    channels_last: str | bool = setting(
        "auto", flag="--channels-last", parse=channels_last_argument, metavar="{auto,on,off}",
        resume=False, commands=RUNTIME_COMMANDS,
        help="memory layout: auto times both once per model and machine and keeps the "
             "verdict; on/off pins it", validator=_check_channels_last)
    max_grad_norm: float | None = setting(
        None, flag="--max-grad-norm", parse=optional(positive_float),
        help="clip the gradient norm to this; none: no clipping", validator=_positive_or_none)
    schedule: str = setting(
        "constant", flag="--schedule", choices=SCHEDULES, validator=v.in_(SCHEDULES),
        help="learning rate per optimizer step: constant, or linear / cosine decay to 0, or "
             "one-cycle")
    warmup: int | float | None = setting(
        None, flag="--warmup", parse=optional(warmup_argument), metavar="N|SHARE",
        help="linear warm-up over N optimizer steps, or a share of the run such as 0.1; none: "
             "the schedule's (one-cycle: 0.3)", validator=_check_warmup)
    accumulate_steps: int = setting(
        1, flag="--accumulate", parse=positive_int, metavar="K", formerly=("accumulate",),
        help="one optimizer step per K batches: an effective batch of K x --batch-size",
        validator=[v.instance_of(int), v.ge(1)])
    label_smoothing: float = setting(
        0.0, flag="--label-smoothing", parse=unit_interval, converter=float,
        help="cross-entropy label smoothing, e.g. 0.1", validator=[v.ge(0.0), v.lt(1.0)])
    ema_decay: float | None = setting(
        None, flag="--ema", parse=optional(ema_decay_argument), metavar="DECAY",
        formerly=("ema",), validator=_check_ema,
        help="validate, test and save a moving average of the weights, e.g. 0.999 (decay "
             "warmed up as timm does); none: off")
    mixup: float = setting(
        0.0, flag="--mixup", parse=non_negative_float, metavar="ALPHA", converter=float,
        validator=v.ge(0.0), help="MixUp training batches, Beta(ALPHA, ALPHA), e.g. 0.2 (0: "
                                  "off); the training pass then runs the whole model")
    cutmix: float = setting(
        0.0, flag="--cutmix", parse=non_negative_float, metavar="ALPHA", converter=float,
        validator=v.ge(0.0), help="CutMix training batches, e.g. 1.0 (0: off); with --mixup, "
                                  "one of the two per batch")
    patience: int | None = setting(
        None, flag="--patience", parse=optional(positive_int), commands=STOPPING_COMMANDS,
        metavar="N", validator=v.optional([v.instance_of(int), v.ge(1)]),
        help="stop after N epochs without an improvement of --monitor (needs a validation "
             "split); none: every epoch trains")
    monitor: str = setting("val_loss", flag="--monitor", choices=MONITORS,
                           commands=STOPPING_COMMANDS, validator=v.in_(MONITORS),
                           help="what --patience watches")
    compile: bool = setting(
        False, flag="--compile", resume=False, validator=v.instance_of(bool),
        help="torch.compile the part that trains (after the activation cache's cut); the "
             "compile is paid once per fit (docs/performance.md measures when it pays)")
    # set from DataConfig.balance ("loss"), so no flag of its own
    class_weights: str = setting("none", flag=None, validator=v.in_(CLASS_WEIGHTS))
    keep_freed_memory: bool = setting(True, flag=None, resume=False,
                                      validator=v.instance_of(bool))
    feature_cache: str = setting(
        "auto", flag="--feature-cache", choices=FEATURE_CACHE_MODES, resume=False,
        validator=v.in_(FEATURE_CACHE_MODES),
        help="run a frozen prefix once per image and train on its stored activations; auto "
             "does so where that is exact")
    cache_memory_gb: float = setting(
        4.0, flag="--cache-memory-gb", parse=non_negative_float, resume=False,
        converter=float, validator=v.ge(0.0),
        help="the activation cache's memory budget, per machine")
    activation_cache_dir: str | None = setting(
        None, flag="--activation-cache-dir", parse=optional(str), resume=False,
        converter=attrs.converters.optional(str),
        help="spill activations over the budget to memory-mapped files here (a local disk; "
             "one file per machine's processes)")

    def __attrs_post_init__(self) -> None:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov is SGD's Nesterov momentum: it needs optimizer='sgd' "
                             "and momentum > 0")


# every declared setting of a run (`finetune.settings`): the command lines, the comparison,
# run.json and the resume checks take theirs from these classes, the data side first
SETTING_CLASSES: tuple[type[DataConfig], type[TrainConfig]] = (DataConfig, TrainConfig)


def setting_classes() -> tuple[type[DataConfig], type[TrainConfig]]:
    """The classes that declare a run's settings, read when used: a subclass with settings
    of its own put here (`SETTING_CLASSES`) gets its flags, records and resume checks."""
    return SETTING_CLASSES
