"""Loggers beside wandb, for teams that may not use a hosted tracker: `CSVLogger` (a plain
metrics.csv) and `TensorBoardLogger` (torch's `SummaryWriter`; the `[tensorboard]` extra). Every
logger writes the same epoch row — `epoch_row`: train/loss, train/accuracy, val/loss,
val/accuracy, val/macro_f1, lr/<group>, epoch_seconds — at the same step, the epoch, so a run
reads alike in each. `make_loggers` builds the set a command line names (`--logger`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.atomic import atomic_write_text
from finetune.callbacks.wandb_logger import WandbLogger, epoch_row
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.trainer import History, Trainer

LOGGERS = ("wandb", "tensorboard", "csv")
TENSORBOARD_MISSING = ("--logger tensorboard needs the tensorboard package: pip install "
                       "'finetune[tensorboard]'")


def logger_names(text: str) -> tuple[str, ...]:
    """`--logger wandb,tensorboard,csv`: any set of LOGGERS, or none."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",")
                                if part.strip()))
    unknown = [name for name in names if name not in (*LOGGERS, "none")]
    if unknown:
        raise ValueError(f"unknown logger {', '.join(unknown)}; choose from "
                         f"{', '.join(LOGGERS)} (comma-separated), or none")
    return tuple(name for name in names if name != "none")


class CSVLogger(Callback):
    """metrics.csv in `directory`: one row per epoch, a column per metric (a column first
    seen in a later epoch is added; earlier rows leave it empty). Rewritten atomically at
    each epoch's end, so a crash keeps every finished epoch."""

    FILE = "metrics.csv"

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / self.FILE
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        # a resumed fit starts from the epochs its checkpoint's history holds
        self.rows = [epoch_row(record) for record in trainer.history.records]

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.rows.append(epoch_row(metrics))
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, buffer.getvalue())


class TensorBoardLogger(Callback):
    """An event file in `directory` (`tensorboard --logdir` reads it): each scalar of the
    epoch row at step = epoch, and the run's settings as text."""

    def __init__(self, directory: str | Path, settings: Mapping[str, Any] | None = None
                 ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(TENSORBOARD_MISSING) from None
        self.directory, self.settings = Path(directory), dict(settings or {})
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.writer = self._writer_class(log_dir=str(self.directory))
        if self.settings:
            self.writer.add_text("settings", "\n".join(
                f"    {key}: {value}" for key, value in self.settings.items()))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        row = epoch_row(metrics)
        step = int(row.pop("epoch"))
        for key, value in row.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_loggers(names: Sequence[str], directory: str | Path, run_name: str, *,
                 settings: Mapping[str, Any] | None = None, wandb_project: str = "finetune",
                 wandb_group: str | None = None, wandb_name: str | None = None
                 ) -> list[Callback]:
    """The loggers `names` asks for, each writing under `directory`/`run_name` (wandb: run
    `wandb_name`, else `run_name`, in `wandb_project` / `wandb_group`)."""
    folder = Path(directory) / run_name
    loggers: list[Callback] = []
    for name in names:
        if name == "csv":
            loggers.append(CSVLogger(folder))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(folder / "tensorboard", settings))
        elif name == "wandb":
            extra = {"group": wandb_group} if wandb_group else {}
            loggers.append(WandbLogger(project=wandb_project, name=wandb_name or run_name,
                                       config=settings, dir=str(directory), **extra))
        else:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    return loggers
