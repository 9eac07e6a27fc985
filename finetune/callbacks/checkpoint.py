"""`Checkpoint`: when and where to write best and last checkpoints.

The Trainer defines what a checkpoint holds (`Trainer.state_dict()`: model, optimizer,
scheduler, strategy, epoch, RNG states, callback states) and `finetune.train.checkpoint` how
it is written (atomically) and read (without unpickling); this callback decides when.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.atomic import remove_orphaned_temporaries
from finetune.callbacks.monitor import is_improvement, monitored_value
from finetune.errors import CheckpointError
from finetune.train.checkpoint import save_checkpoint
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.trainer import Trainer


class Checkpoint(Callback):
    """Write `last.pt` after every epoch and `best.pt` whenever `monitor` improves.

    `monitor` names a column of the epoch metrics ("val_accuracy", "val_loss", …); `mode` is
    "max" or "min". Resume with `trainer.fit(..., resume=checkpoint.last_path)`.

    A new run (not a resume) refuses a folder that already holds `last.pt` or `best.pt`
    unless `overwrite=True`, so an earlier run's results are never replaced by accident.
    `best.pt` is written before `last.pt` records it, so a crash between the two never leaves
    a `last.pt` that names a best `best.pt` does not hold.
    """

    def __init__(
        self,
        dirpath: str | Path,
        monitor: str = "val_accuracy",
        mode: str = "max",
        save_last: bool = True,
        save_best: bool = True,
        overwrite: bool = False,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' (got {mode!r})")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.save_last = save_last
        self.save_best = save_best
        self.overwrite = overwrite
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
        if improved:  # first: last.pt may only record a best that best.pt holds
            save_checkpoint(state, self.best_path)
        if self.save_last:
            save_checkpoint(state, self.last_path)

    def check_folder(self, resuming: bool = False) -> None:
        """Refuse a folder holding another run's checkpoints (unless `overwrite`); called at
        fit start, and by front ends before costly work such as an lr search."""
        existing = [p.name for p in (self.last_path, self.best_path) if p.is_file()]
        if existing == [self.best_path.name] and not resuming and not self.overwrite:
            raise CheckpointError(
                f"{self.dirpath} holds best.pt but no last.pt: a run stopped after saving its "
                "best epoch and before writing last.pt. best.pt is a full checkpoint: resume "
                f"from it (fit(..., resume={str(self.best_path)!r}), `finetune train --resume "
                f"{self.dirpath}`), or pass Checkpoint(..., overwrite=True) (`--overwrite`) to "
                "start over."
            )
        if existing and not resuming and not self.overwrite:
            raise CheckpointError(
                f"{self.dirpath} already holds {' and '.join(existing)} of another run; resume "
                "it (fit(..., resume=...), `finetune train --resume`), choose another folder, or "
                "pass Checkpoint(..., overwrite=True) (`--overwrite`) to replace it."
            )

    def on_fit_start(self, trainer: Trainer) -> None:
        """Refuse to start a new run over another one's files; on resume, clean what a killed
        run left (temporary files) and rewrite a best.pt that went missing."""
        self.check_folder(resuming=trainer.state.start_epoch > 0)
        for path in (self.last_path, self.best_path):
            remove_orphaned_temporaries(path)
        if self.save_best and self.best is not None and not self.best_path.is_file():
            if self.last_path.is_file():  # not a resume into a fresh folder: a lost best.pt
                warnings.warn(
                    f"the resumed checkpoint records a best {self.monitor} of {self.best:.4g} "
                    f"at epoch {(self.best_epoch or 0) + 1}, but {self.best_path} is missing; "
                    "best.pt is written again at the next epoch.", RuntimeWarning, stacklevel=2,
                )
            self.best = self.best_epoch = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
