"""`Optimization`: the optimizer and scheduler the Trainer rebuilds whenever the strategy
changes what trains, so the optimizer only ever holds trainable parameters."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from finetune.train.config import TrainConfig

_PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau

OptimizerSpec = Optimizer | Callable[[list[dict[str, Any]]], Optimizer] | None
SchedulerSpec = Callable[[Optimizer], Any] | None


class Optimization:
    """Builds the optimizer from a strategy's param groups and the scheduler on top of it.

    `optimizer`: None (Adam at `config.lr` / `config.weight_decay`), a factory called with the
    groups, or an instance used as a template (its class and `defaults`). `scheduler`: None
    or a factory `optimizer -> LRScheduler`, stepped once per epoch.
    """

    def __init__(self, optimizer: OptimizerSpec, scheduler: SchedulerSpec) -> None:
        if scheduler is not None and (not callable(scheduler) or isinstance(
            scheduler, (torch.optim.lr_scheduler.LRScheduler, _PLATEAU))):
            raise TypeError(
                "scheduler must be a factory taking the optimizer, e.g. "
                "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5): the Trainer "
                "rebuilds the optimizer when the strategy changes, and a scheduler instance is "
                "bound to one optimizer."
            )
        self._optimizer_spec = optimizer
        self._scheduler_spec = scheduler

    def build(self, groups: list[dict[str, Any]], epoch: int, config: TrainConfig,
              description: str, previous: Optimizer | None) -> tuple[Optimizer, Any]:
        """The optimizer over `groups` (a strategy's param groups for `epoch`), carrying
        per-parameter state (e.g. Adam moments) over from `previous` for parameters that still
        train — and none for the rest — and the scheduler brought to `epoch`."""
        if not groups:
            raise ValueError(
                f"{description} leaves nothing trainable at epoch {epoch}; "
                "there is nothing to optimise."
            )
        optimizer = self._make_optimizer(groups, config)
        held = [p for g in optimizer.param_groups for p in g["params"]]
        frozen = sum(1 for p in held if not p.requires_grad)
        if frozen:
            raise ValueError(f"the optimizer factory added {frozen} frozen parameters; build "
                             "the optimizer from the param groups it is given.")
        if previous is not None:
            for parameter in held:
                if parameter in previous.state:
                    optimizer.state[parameter] = previous.state[parameter]
        scheduler = None
        if self._scheduler_spec is not None:
            scheduler = self._scheduler_spec(optimizer)
            if not is_plateau(scheduler):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    for _ in range(epoch):
                        scheduler.step()
        return optimizer, scheduler

    def _make_optimizer(self, groups: list[dict[str, Any]], config: TrainConfig) -> Optimizer:
        spec = self._optimizer_spec
        if spec is None:
            return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        if isinstance(spec, Optimizer):
            return type(spec)(groups, **spec.defaults)
        return spec(groups)


def learning_rates(optimizer: Optimizer) -> dict[str, float]:
    """`lr/<group name>` of each param group (numbered when a name repeats)."""
    rates, seen = {}, {}
    for group in optimizer.param_groups:
        name = str(group.get("name", "group"))
        seen[name] = seen.get(name, 0) + 1
        key = f"lr/{name}" if seen[name] == 1 else f"lr/{name}#{seen[name]}"
        rates[key] = float(group["lr"])
    return rates


def step_scheduler(scheduler: Any, metrics: dict[str, float]) -> None:
    """One epoch's step; ReduceLROnPlateau gets the validation loss (else the train loss)."""
    if scheduler is None:
        return
    if is_plateau(scheduler):
        scheduler.step(metrics.get("val_loss", metrics["train_loss"]))
    else:
        scheduler.step()


def is_plateau(scheduler: Any) -> bool:
    return isinstance(scheduler, _PLATEAU)
