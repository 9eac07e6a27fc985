"""Callbacks observe the Trainer's events (see `Event` and docs/callbacks.md)."""

from finetune.callbacks.base import Callback, Event
from finetune.callbacks.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from finetune.callbacks.early_stopping import EarlyStopping
from finetune.callbacks.per_class import PerClassEvaluation
from finetune.callbacks.progress import ProgressBar
from finetune.callbacks.wandb_logger import WandbLogger

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "Event",
    "PerClassEvaluation",
    "ProgressBar",
    "WandbLogger",
    "load_checkpoint",
    "save_checkpoint",
]
