"""`OptimizerStep`: what one training batch does to the weights, read top to bottom in one
method — the lr for this optimizer step (`finetune.train.schedules`), zero the gradients,
forward under the run's autocast, loss, backward (scaled under fp16), and on the last batch
of an accumulation window: unscale, rescale, clip, step — as torchvision's `train_one_epoch`
does it. The Trainer's epoch loop only feeds it batches.

Gradient accumulation: a window of `accumulate_steps` batches (fewer for an epoch's
remainder) makes one optimizer step. Each batch's loss is weighted by its share of the
window's images, so k batches of B images step exactly like one batch of kB (for models
without BatchNorm, whose statistics see B at a time). Only the window's last batch needs
gradients synchronised across processes: the forward and backward of the others run under
the model's own `no_sync` (`DistributedDataParallel.no_sync`, where the model is wrapped).
A non-finite loss on any process stops every process at the same batch.

The step is built with every part it uses — loss, schedule, clipping, accumulation, device
and precision (hence its scaler) — and nothing sets them afterwards: the loop passes each
batch, and whether that batch closes its epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from finetune.errors import FinetuneError
from finetune.runtime import distributed
from finetune.runtime.precision import autocast
from finetune.train.schedules import StepSchedule
from finetune.train.state import StepOutput

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Forward = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteLossError(FinetuneError, FloatingPointError):
    """The loss became NaN or infinite; training cannot continue from these weights."""


class OptimizerStep:
    """One batch's share of an optimizer step, with the run's lr schedule, precision, loss,
    clipping, accumulation and (fp16) gradient scaler.

    `loss_fn(logits, labels)` gets fp32 logits; `max_grad_norm` clips the norm of the
    optimizer's parameters' gradients after unscaling (None does not clip); `schedule` sets
    each group's lr per optimizer step (None: the lrs stay as the optimizer was built)."""

    def __init__(self, loss_fn: LossFunction, max_grad_norm: float | None = None,
                 accumulate_steps: int = 1, schedule: StepSchedule | None = None,
                 device: torch.device | None = None, precision: str = "fp32") -> None:
        self.loss_fn = loss_fn
        self.max_grad_norm = max_grad_norm
        self.accumulate_steps = accumulate_steps
        self.schedule = schedule or StepSchedule("constant", None, None)
        # autocast to `precision` on `device`, and a GradScaler for fp16 (its small range
        # would flush small gradients to zero)
        self.device, self.precision = device or torch.device("cpu"), precision
        self.scaler = (torch.amp.GradScaler(self.device.type) if precision == "fp16"
                       else None)
        self._batches = 0  # batches in the open window
        self._reference = 0  # images in the window's first batch
        self._images = 0  # images in the open window

    # -- the decision the loop and a DDP wrapper share -----------------------------------------
    @property
    def pending(self) -> bool:
        """Whether gradients of an unfinished window wait for their optimizer step."""
        return self._batches > 0

    def steps_now(self, closes_epoch: bool = False) -> bool:
        """Whether the coming batch is the last of its window (the optimizer steps after it,
        so its backward is the one whose gradients must be synchronised)."""
        return self._batches + 1 >= self.accumulate_steps or closes_epoch

    # -- one batch -----------------------------------------------------------------------------
    def __call__(self, optimizer: Optimizer, model: Forward, images: torch.Tensor,
                 labels: torch.Tensor, *, targets: torch.Tensor | None = None, step: int = 0,
                 closes_epoch: bool = False, where: str = "") -> StepOutput:
        """Train on one batch: `model(images)` (the whole network, or the suffix after cached
        activations) under the run's autocast, backward its weighted loss, and update the
        weights if the window is complete. `targets` (soft targets of mixed images) replace
        `labels` in the loss; accuracy counts against `labels`. `step` is the optimizer step
        this batch belongs to (the schedule's clock); `closes_epoch`: the epoch's last batch,
        which steps whatever its window holds; `where` ("epoch E, batch B") names the batch in
        a non-finite loss error."""
        stepping = self.steps_now(closes_epoch)
        if self._batches == 0:  # a window opens: its lr, and fresh gradients
            self.schedule.apply(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
            self._reference = len(labels)
        no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP's, if wrapped
        with contextlib.nullcontext() if stepping else no_sync():
            with autocast(self.device, self.precision):
                logits = model(images)
            loss = self.loss_fn(logits.float(), labels if targets is None else targets)
            value = float(loss.detach())
            # every process stops at the same batch, before backward starts DDP's reduction:
            # one process leaving alone would leave the others in a collective it never joins
            if distributed.any_rank(not math.isfinite(value)):
                self._batches = self._images = 0
                shown = value if not math.isfinite(value) else "not finite on another process"
                raise NonFiniteLossError(
                    f"loss is {shown} at {where}; lower the learning rate, set max_grad_norm, "
                    "or check the inputs for NaN."
                )
            # its share of a nominal window (k batches like the first); update() corrects a
            # window whose images differ from that, e.g. an epoch's short remainder
            share = len(labels) / (self.accumulate_steps * self._reference)
            weighted = loss * share if share != 1.0 else loss
            (self.scaler.scale(weighted) if self.scaler else weighted).backward()
        self._batches += 1
        self._images += len(labels)
        if stepping:
            self.update(optimizer)
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        return StepOutput(loss=value, correct=correct, count=len(labels), stepped=stepping)

    def update(self, optimizer: Optimizer) -> None:
        """Close the window: rescale to the true image count, unscale, clip, step."""
        nominal = self.accumulate_steps * self._reference
        correction = nominal / self._images if self._images else 1.0
        self._batches = self._images = 0
        if self.scaler is not None and (correction != 1.0 or self.max_grad_norm is not None):
            self.scaler.unscale_(optimizer)  # clip and rescale true gradients
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        if correction != 1.0:
            torch._foreach_mul_([p.grad for p in trainable if p.grad is not None], correction)
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (its current scale and growth tracker), None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None (an older checkpoint, or a run without fp16) keeps
        the fresh scaler."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


