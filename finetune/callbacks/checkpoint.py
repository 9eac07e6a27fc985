"""`Checkpoint`: when and where to write best and last checkpoints.

The Trainer defines what a checkpoint holds (`Trainer.state_dict()`: model, optimizer,
scheduler, strategy, epoch, RNG states, callback states) and `finetune.core.checkpoint` how
it is written (atomically) and read (without unpickling); this callback decides when.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.callbacks.monitor import is_improvement, monitored_value
from finetune.core.checkpoint import save_checkpoint
from finetune.core.events import Callback

if TYPE_CHECKING:
    from finetune.core.trainer import Trainer


class Checkpoint(Callback):
    """Write `last.pt` after every epoch and `best.pt` whenever `monitor` improves.

    `monitor` names a column of the epoch metrics ("val_accuracy", "val_loss", …); `mode` is
    "max" or "min". Resume with `trainer.fit(..., resume=checkpoint.last_path)`.
    """

    def __init__(
        self,
        dirpath: str | Path,
        monitor: str = "val_accuracy",
        mode: str = "max",
        save_last: bool = True,
        save_best: bool = True,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' (got {mode!r})")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.save_last = save_last
        self.save_best = save_best
        self.best: float | None = None
        self.best_epoch: int | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.pt"

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        improved = False
        if self.save_best:
            value = monitored_value(metrics, self.monitor, "Checkpoint")
            improved = is_improvement(value, self.best, self.mode)
            if improved:
                self.best, self.best_epoch = value, trainer.state.epoch
        if not (self.save_last or improved):
            return
        state = trainer.state_dict()  # after updating `best`, so it is saved with it
        if self.save_last:
            save_checkpoint(state, self.last_path)
        if improved:
            save_checkpoint(state, self.best_path)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
