"""Per-step learning-rate schedules: linear warm-up, then constant, linear or cosine decay, or
a one-cycle ramp up and down.

The one learning-rate mechanism: each param group's lr is its base lr (what the strategy gave
it when the optimizer was built) times a factor, set by `StepSchedule.apply` at every
optimizer step. The factor is `lr_multiplier(step)` — a pure function of the global step, so
an optimizer rebuilt at an epoch boundary (gradual unfreezing, LP-FT) or restored from a
checkpoint needs nothing but the restored `global_step` to continue on the same curve — times,
if the Trainer was given an epoch-wise torch scheduler (`scheduler=`), that scheduler's factor
(`EpochScheduler`): it runs on a one-group shadow optimizer whose lr starts at 1.0, so its lr
is the factor, and it never needs rebinding when the strategy rebuilds the real optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from finetune.train.config import SCHEDULES

# one-cycle without an explicit warm-up spends this share of the steps rising (fastai, torch)
ONE_CYCLE_WARMUP = 0.3
# one-cycle starts at max/25 and ends at max/(25 * 1e4), as torch's OneCycleLR and fastai
ONE_CYCLE_START = 1 / 25
ONE_CYCLE_END = ONE_CYCLE_START / 1e4
BASE_LR_KEY = "base_lr"  # the group's unscheduled lr, kept in the group (and its checkpoint)


def warmup_steps(schedule: str, warmup: int | float | None, total: int | None) -> int:
    """Warm-up length in optimizer steps: an int is steps, a float in [0, 1) a share of
    `total`; None is the schedule's default (0.3 of the run for one-cycle, else none)."""
    if warmup is None:
        warmup = ONE_CYCLE_WARMUP if schedule == "one-cycle" else 0
    if isinstance(warmup, int):
        return warmup
    if total is None:
        raise ValueError(
            f"warmup={warmup} is a share of the run's optimizer steps, but the training loader "
            "has no length; give the warm-up in steps (an int) or a loader with __len__."
        )
    return round(warmup * total)


def lr_multiplier(schedule: str, step: int, total: int | None, warmup: int) -> float:
    """The factor on the base lr for optimizer step `step` (0-based) of `total`.

    Warm-up rises linearly to 1 over `warmup` steps (step 0 already moves: (step+1)/warmup);
    one-cycle's rise is a half cosine from 1/25. After it: constant 1, or a linear or cosine
    decay that reaches 0 (one-cycle: 1/250000) at step `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if step < warmup:
        if schedule == "one-cycle":
            return _cosine_between(ONE_CYCLE_START, 1.0, step / warmup)
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if total is None:
        raise ValueError(
            f"schedule={schedule!r} decays over the whole run, but the training loader has no "
            "length to count its steps; use a loader with __len__ or schedule='constant'."
        )
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return _cosine_between(1.0, 0.0, progress)
    return _cosine_between(1.0, ONE_CYCLE_END, progress)


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


class EpochScheduler:
    """A torch lr scheduler stepped once per epoch, as a factor on every group's base lr.

    `factory(optimizer)` builds it (e.g. `functools.partial(StepLR, step_size=5)`) on a
    shadow optimizer with one group at lr 1.0 (and momentum, for schedulers that cycle it), so
    its lr is the factor. Its lrs are relative: a scheduler given absolute lrs (OneCycleLR's
    `max_lr`, CyclicLR's bounds) reads them as factors — use `TrainConfig(schedule=...)`
    for those shapes. `step(metrics)` steps it; ReduceLROnPlateau gets the validation loss
    (else the train loss)."""

    def __init__(self, factory: Callable[[Optimizer], Any]) -> None:
        self._shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0,
                                       momentum=0.9)
        self.scheduler = factory(self._shadow)
        if getattr(self.scheduler, "optimizer", None) is not self._shadow:
            raise TypeError("scheduler= must build its scheduler on the optimizer it is given")
        self._shadow.step()  # no gradient, no change: the scheduler sees an optimizer step

    @property
    def factor(self) -> float:
        return float(self._shadow.param_groups[0]["lr"])

    def step(self, metrics: dict[str, float]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics.get("val_loss", metrics["train_loss"]))
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a state saved by a scheduler on the real optimizer (older
        checkpoints: absolute lrs per group) is read relative to its first group's base lr."""
        base = (state.get("base_lrs") or [1.0])[0]
        if base not in (0, 1.0):
            state = {**state, "base_lrs": [1.0], "_last_lr": [
                lr / base for lr in (state.get("_last_lr") or [base])][:1]}
        self.scheduler.load_state_dict(state)
        self._shadow.param_groups[0]["lr"] = _last_factor(self.scheduler, state)


def _last_factor(scheduler: Any, state: dict[str, Any]) -> float:
    last = state.get("_last_lr") or getattr(scheduler, "_last_lr", None) or [1.0]
    return float(last[0])


class StepSchedule:
    """Sets every param group's lr for a global step; `total` optimizer steps in the run (None
    when the loader has no length: only warm-up + constant can run then). `epochs` is the
    epoch-wise scheduler whose factor multiplies the step's, if any."""

    def __init__(self, schedule: str, warmup: int | float | None, total: int | None,
                 epochs: EpochScheduler | None = None) -> None:
        self.schedule = schedule
        self.total = total
        self.warmup = warmup_steps(schedule, warmup, total)
        self.epochs = epochs
        lr_multiplier(schedule, 0, total, self.warmup)  # a bad name or a missing total fails now

    @property
    def active(self) -> bool:
        """Whether the lrs ever differ from the base lrs (else nothing is written)."""
        return self.schedule != "constant" or self.warmup > 0 or self.epochs is not None

    def apply(self, optimizer: Optimizer, step: int) -> None:
        """lr = base lr × multiplier(step) × the epoch scheduler's factor in each group; the
        base is recorded in the group on first sight, so a freshly built optimizer starts
        from the strategy's lrs."""
        if not self.active:
            return
        factor = lr_multiplier(self.schedule, step, self.total, self.warmup)
        if self.epochs is not None:
            factor *= self.epochs.factor
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault(BASE_LR_KEY, group["lr"]) * factor


def total_steps(epochs: int, batches_per_epoch: int | None, accumulate_steps: int) -> int | None:
    """Optimizer steps in a run: an epoch's remainder window steps too."""
    if batches_per_epoch is None:
        return None
    return epochs * math.ceil(batches_per_epoch / accumulate_steps)
