"""`OptimizerStep`: what one training batch does to the weights — zero the gradients, forward,
loss, backward, clip, step — kept apart from the loop so the Trainer stays a loop and the step
can grow (accumulation, loss scaling, schedules) without touching it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from finetune.core.state import StepOutput
from finetune.errors import FinetuneError

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(FinetuneError, FloatingPointError):
    """The loss became NaN or infinite; training cannot continue from these weights."""


class OptimizerStep:
    """One optimizer step over one batch, with the run's loss and gradient clipping.

    `loss_fn(logits, labels)` gets fp32 logits; `max_grad_norm` clips the norm of the
    optimizer's parameters' gradients (None does not clip)."""

    def __init__(self, loss_fn: LossFunction, max_grad_norm: float | None = None) -> None:
        self.loss_fn = loss_fn
        self.max_grad_norm = max_grad_norm

    def __call__(self, optimizer: Optimizer, logits_of: Callable[[], torch.Tensor],
                 labels: torch.Tensor, where: str) -> StepOutput:
        """Run `logits_of()` (the forward, under the run's autocast) and update the weights;
        `where` ("epoch E, batch B") names the batch in a non-finite loss error."""
        optimizer.zero_grad(set_to_none=True)
        logits = logits_of()
        loss = self.loss_fn(logits.float(), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at {where}; lower the learning rate, set max_grad_norm, or "
                "check the inputs for NaN."
            )
        loss.backward()
        if self.max_grad_norm is not None:
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        optimizer.step()
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        return StepOutput(loss=value, correct=correct, count=len(labels))
