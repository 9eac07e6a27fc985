"""`Checkpoint`: best and last checkpoints, written atomically, loaded without unpickling.

The Trainer defines what a checkpoint holds (`Trainer.state_dict()`: model, optimizer,
scheduler, strategy, epoch, RNG states, callback states); this callback decides when and
where to write one. Each write goes to a temporary file in the same folder, is fsync'd and
then renamed over the target, so a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.atomic import atomic_write
from finetune.callbacks.base import Callback, is_improvement, monitored_value
from finetune.errors import CheckpointError

if TYPE_CHECKING:
    from finetune.trainer import Trainer


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """`torch.save` to a temp file beside `path`, fsync, then `os.replace` onto `path`."""
    return atomic_write(path, lambda file: torch.save(state, file), durable=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it must be a "
            "file written by finetune's Checkpoint callback."
        ) from error
    from finetune.trainer import CHECKPOINT_FORMAT

    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a finetune checkpoint (format {CHECKPOINT_FORMAT}); for bare model "
            "weights use backbone.model.load_state_dict(torch.load(path, weights_only=True))."
        )
    return state


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
