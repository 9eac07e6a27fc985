"""Callbacks act at the Trainer's events, within each event's defined powers (see `Event` and
docs/callbacks.md)."""

from finetune.callbacks.checkpoint import Checkpoint
from finetune.callbacks.console import EpochLines, FreezeReportLines
from finetune.callbacks.early_stopping import EarlyStopping
from finetune.callbacks.loggers import CSVLogger, TensorBoardLogger, make_loggers
from finetune.callbacks.per_class import PerClassEvaluation
from finetune.callbacks.progress import ProgressBar
from finetune.callbacks.wandb_logger import WandbLogger
from finetune.train.checkpoint import load_checkpoint, save_checkpoint
from finetune.train.events import Callback, Event, StopFit

__all__ = [
    "CSVLogger",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "EpochLines",
    "Event",
    "FreezeReportLines",
    "PerClassEvaluation",
    "ProgressBar",
    "StopFit",
    "TensorBoardLogger",
    "WandbLogger",
    "load_checkpoint",
    "make_loggers",
    "save_checkpoint",
]
