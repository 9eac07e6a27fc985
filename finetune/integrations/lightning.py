"""Drive a `FreezeStrategy` from a Lightning `Trainer` (`pip install 'finetune[lightning]'`).

    from finetune.integrations.lightning import FreezeStrategyCallback

    trainer = lightning.Trainer(max_epochs=5,
                                callbacks=[FreezeStrategyCallback(FreezeFraction(0.8))])
    trainer.fit(module)      # a LightningModule holding one finetune Backbone

The callback does per epoch what finetune's own Trainer does: sets `requires_grad`, keeps the
BatchNorm layers the strategy froze in eval mode (their running statistics never move), and
gives the optimizer the strategy's parameter groups — only trainable parameters, each at the
optimizer's lr × the strategy's multiplier. Groups are a pure function of the epoch, rebuilt
only where `strategy.changes_at(epoch)`, with per-parameter state (Adam moments) carried over,
so a checkpoint resumes with the same group layout it was saved with. See
docs/integrations.md for how this differs from Lightning's own `BackboneFinetuning`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.model.backbone import Backbone
from finetune.strategies import FreezeReport, FreezeStrategy

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "finetune.integrations.lightning needs Lightning: pip install 'finetune[lightning]' "
        "(or pip install lightning)."
    ) from error

# Group keys that are the strategy's, not the optimizer's hyper-parameters.
_OWN_KEYS = ("params", "lr", "name", "lr_multiplier", "initial_lr")


class FreezeStrategyCallback(pl.Callback):
    """Apply `strategy` to the LightningModule's `Backbone` at every training epoch.

    `lr`: the base learning rate the strategy's multipliers scale; default: the lr of the
    optimizer's first parameter group as `configure_optimizers` built it. `backbone`: the
    attribute holding the Backbone when the module holds several (default: the only one).
    Parameters of the module outside the Backbone (an extra head, say) keep training in a
    group of their own named "other", at the base lr.
    """

    def __init__(self, strategy: FreezeStrategy, lr: float | None = None,
                 backbone: str | None = None) -> None:
        if not isinstance(strategy, FreezeStrategy):
            raise TypeError(f"strategy must be a finetune FreezeStrategy, got {strategy!r}; "
                            "e.g. FreezeStrategyCallback(FreezeFraction(0.8)).")
        self.strategy, self.lr, self.attribute = strategy, lr, backbone
        self.epoch: int | None = None  # the epoch the groups were last built for
        self.report: FreezeReport | None = None
        self._backbone: Backbone | None = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before configure_optimizers: an optimizer over `filter(requires_grad)` sees the plan.
        if stage == "fit":
            self._backbone = self.find_backbone(pl_module)
            self.report = self.strategy.apply(self._backbone, self.epoch or 0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_optimizers, before a checkpoint's optimizer state is loaded: the groups
        # must then have the layout they were saved with, i.e. that of the saved epoch.
        self._configure(trainer, pl_module, self.epoch or 0, fit_start=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch != self.epoch and self.strategy.changes_at(epoch):
            self._configure(trainer, pl_module, epoch, fit_start=False)
        self.epoch = epoch
        self._keep_frozen_norms_in_eval(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # Cheap insurance: user code may call .train() on the inner model, which bypasses
        # Backbone.train's BatchNorm policy.
        self._keep_frozen_norms_in_eval(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "lr": self.lr, "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.lr = state_dict["epoch"], state_dict["lr"]

    # -- helpers ------------------------------------------------------------------------------
    def find_backbone(self, pl_module: nn.Module) -> Backbone:
        """The Backbone the strategy acts on: `pl_module.<backbone>` or the only one inside."""
        if self.attribute is not None:
            found = getattr(pl_module, self.attribute, None)
            if not isinstance(found, Backbone):
                raise FinetuneError(f"{type(pl_module).__name__}.{self.attribute} is "
                                    f"{type(found).__name__}, not a finetune Backbone; pass the "
                                    "attribute that holds one as backbone=.")
            return found
        found_all = [m for m in pl_module.modules() if isinstance(m, Backbone)]
        if len(found_all) != 1:
            raise FinetuneError(
                f"{type(pl_module).__name__} holds {len(found_all)} finetune Backbones; the "
                "callback needs exactly one. Keep the model as a Backbone attribute (e.g. "
                "self.backbone = Backbone.resnet50(10)), or name it: "
                "FreezeStrategyCallback(strategy, backbone='attribute_name')."
            )
        return found_all[0]

    def param_groups(self, pl_module: nn.Module, lr: float, epoch: int = 0
                     ) -> list[dict[str, Any]]:
        """The strategy's groups for `epoch`, plus "other" for trainable parameters outside the
        Backbone. Usable in `configure_optimizers` (then the optimizer already has the layout
        the callback wants and is left as built — needed for schedulers such as OneCycleLR
        that keep their own per-group settings)."""
        backbone = self.find_backbone(pl_module)
        groups = self.strategy.param_groups(backbone, lr, epoch)
        inside = {id(p) for p in backbone.parameters()}
        other = [p for p in pl_module.parameters() if id(p) not in inside and p.requires_grad]
        if other:
            groups.append({"params": other, "lr": lr, "name": "other", "lr_multiplier": 1.0})
        return groups

    def _configure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
                   fit_start: bool) -> None:
        backbone = self.find_backbone(pl_module)
        self.report = self.strategy.apply(backbone, epoch)
        if len(trainer.optimizers) != 1:
            raise FinetuneError(f"FreezeStrategyCallback drives one optimizer; "
                                f"configure_optimizers returned {len(trainer.optimizers)}. "
                                "Return a single optimizer (the strategy sets per-group lrs).")
        optimizer = trainer.optimizers[0]
        if self.lr is None:
            self.lr = float(optimizer.param_groups[0].get("initial_lr",
                                                          optimizer.param_groups[0]["lr"]))
        groups = self.param_groups(pl_module, self.lr, epoch)
        if not groups:
            raise FinetuneError(f"{self.strategy.describe()} leaves nothing trainable at epoch "
                                f"{epoch}; there is nothing to optimise.")
        if fit_start and _same_layout(optimizer, groups):
            self.epoch = epoch
            return
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs
                      if getattr(c.scheduler, "optimizer", None) is optimizer]
        factor = _schedule_factor(optimizer)
        foreign = {k for g in optimizer.param_groups for k in g
                   if k not in _OWN_KEYS and k not in optimizer.defaults}
        _replace_groups(optimizer, groups)
        for scheduler in schedulers:
            _rebind(scheduler, optimizer, factor, foreign)
        self.epoch = epoch

    def _keep_frozen_norms_in_eval(self, pl_module: nn.Module) -> None:
        backbone = self._backbone or self.find_backbone(pl_module)
        if backbone.training:
            for name in backbone.frozen_norm_layers:
                backbone.model.get_submodule(name).eval()


def _same_layout(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
    held = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    return held == [[id(p) for p in g["params"]] for g in groups]


def _schedule_factor(optimizer: torch.optim.Optimizer) -> float:
    """How far a scheduler has moved the lr from its base (1.0 without one)."""
    first = optimizer.param_groups[0]
    base = first.get("initial_lr", first["lr"])
    return first["lr"] / base if base else 1.0


def _replace_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Swap in `groups` (the optimizer's own defaults fill the rest), keeping the state of
    parameters that still train and dropping that of the ones that no longer do."""
    state = optimizer.state
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(dict(group))
    held = {p for g in optimizer.param_groups for p in g["params"]}
    for parameter in [p for p in state if p not in held]:
        del state[parameter]


def _rebind(scheduler: Any, optimizer: torch.optim.Optimizer, factor: float,
            foreign: set[str]) -> None:
    """Point an lr scheduler that scales each group's base lr at the new groups; refuse one
    that wrote its own settings (`foreign` keys, e.g. OneCycleLR's max_lr) into the groups."""
    groups = optimizer.param_groups
    if foreign:
        _refuse(scheduler)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:
        if len({id(f) for f in lambdas}) != 1:
            _refuse(scheduler)
        scheduler.lr_lambdas = [lambdas[0]] * len(groups)
    per_group = [k for k in ("max_lrs", "min_lrs") if isinstance(getattr(scheduler, k, None),
                                                                 list)]
    for key in per_group:
        values = getattr(scheduler, key)
        if len(set(values)) != 1:
            _refuse(scheduler)
        setattr(scheduler, key, [values[0]] * len(groups))
    for group in groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"] * factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in groups]


def _refuse(scheduler: Any) -> None:
    raise FinetuneError(
        f"{type(scheduler).__name__} keeps its own per-group settings, which cannot follow the "
        "strategy's new optimizer groups. Fix: build the optimizer from the callback's groups in "
        "configure_optimizers — torch.optim.Adam(callback.param_groups(self, lr)) — so nothing "
        "needs rebuilding (static strategies), or use a scheduler that scales the base lr "
        "(StepLR, CosineAnnealingLR, LambdaLR with one function)."
    )
