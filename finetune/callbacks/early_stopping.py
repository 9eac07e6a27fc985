"""`EarlyStopping`: stop when a monitored metric has not improved for `patience` epochs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.callbacks.monitor import is_improvement, monitored_value
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.config import TrainConfig
    from finetune.train.trainer import Trainer

MODES = {"val_loss": "min", "val_accuracy": "max"}


class EarlyStopping(Callback):
    """Ask the Trainer to stop after `patience` epochs without an improvement of more than
    `min_delta` in `monitor` ("max" or "min" `mode`). The Trainer finishes the epoch, fires
    `on_fit_end` and marks `history.stopped_early`."""

    def __init__(
        self, monitor: str = "val_loss", mode: str = "min", patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' (got {mode!r})")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer ≥ 1 (got {patience!r})")
        if min_delta < 0:
            raise ValueError(f"min_delta must be ≥ 0 (got {min_delta!r})")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = monitored_value(metrics, self.monitor, "EarlyStopping")
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.state.epoch
            trainer.state.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.stopped_epoch = (
            state["best"], state["wait"], state["stopped_epoch"])


def early_stopping(config: TrainConfig) -> list[Callback]:
    """The `EarlyStopping` a config's `patience` and `monitor` ask for (none without
    patience): what `finetune train --patience` and `finetune compare --patience` add."""
    if config.patience is None:
        return []
    return [EarlyStopping(config.monitor, MODES[config.monitor], config.patience)]
