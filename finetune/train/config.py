"""Run configuration as frozen, validated attrs classes: a bad value fails when the config is
built, not an hour into training, and sweeps are `attrs.evolve(config, lr=...)`."""

from __future__ import annotations

import math
import re
import warnings

import attrs
from attrs import validators as v

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine", "one-cycle")  # finetune.train.schedules
FEATURE_CACHE_MODES = ("auto", "on", "off")
CLASS_WEIGHTS = ("none", "balanced")
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


@attrs.frozen(kw_only=True)
class TrainConfig:
    """What one `Trainer.fit` run does. Defaults follow the reference setup (Adam, lr 1e-4,
    cross-entropy); `precision="auto"` and `channels_last="auto"` pick the fast path per model.

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

    epochs: int = attrs.field(default=10, validator=[v.instance_of(int), v.ge(1)])
    lr: float = attrs.field(default=1e-4, converter=float, validator=_check_lr)
    weight_decay: float = attrs.field(default=0.0, converter=float, validator=v.ge(0.0))
    seed: int | None = attrs.field(default=0, validator=v.optional(v.instance_of(int)))
    precision: str = attrs.field(default="auto", validator=v.in_(PRECISIONS))
    device: str = attrs.field(default="auto", validator=_check_device)
    channels_last: str | bool = attrs.field(default="auto", validator=_check_channels_last)
    max_grad_norm: float | None = attrs.field(default=None, validator=_positive_or_none)
    schedule: str = attrs.field(default="constant", validator=v.in_(SCHEDULES))
    warmup: int | float | None = attrs.field(default=None, validator=_check_warmup)
    accumulate_steps: int = attrs.field(default=1, validator=[v.instance_of(int), v.ge(1)])
    label_smoothing: float = attrs.field(default=0.0, converter=float,
                                         validator=[v.ge(0.0), v.lt(1.0)])
    ema_decay: float | None = attrs.field(default=None, validator=_check_ema)
    mixup: float = attrs.field(default=0.0, converter=float, validator=v.ge(0.0))
    cutmix: float = attrs.field(default=0.0, converter=float, validator=v.ge(0.0))
    class_weights: str = attrs.field(default="none", validator=v.in_(CLASS_WEIGHTS))
    keep_freed_memory: bool = attrs.field(default=True, validator=v.instance_of(bool))
    feature_cache: str = attrs.field(default="auto", validator=v.in_(FEATURE_CACHE_MODES))
    cache_memory_gb: float = attrs.field(default=4.0, converter=float, validator=v.ge(0.0))
    activation_cache_dir: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(str)
    )
