"""`WandbLogger`: log a run to Weights & Biases with the real `wandb` package.

Without an API key the run is written offline (and the logger says where, and how to
`wandb sync` it). wandb trouble never stops training: a failed `init` falls back to offline,
then to no logging, each with a warning.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import attrs
import numpy as np

from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.stats.metrics import EvaluationReport
    from finetune.train.trainer import History, Trainer

PER_CLASS_COLUMNS = ["class", "accuracy", "precision", "recall", "f1", "support"]


def epoch_row(metrics: Mapping[str, float]) -> dict[str, Any]:
    """What every logger writes of an epoch (`finetune.callbacks.loggers`): `epoch`,
    train/* and val/* (from train_* and val_*), lr/<group> and epoch_seconds."""
    row: dict[str, Any] = {"epoch": int(metrics["epoch"])}
    for key, value in metrics.items():
        if key.startswith(("train_", "val_")):
            split, _, name = key.partition("_")
            row[f"{split}/{name}"] = value
        elif key.startswith("lr/") or key == "epoch_seconds":
            row[key] = value
    return row


def has_api_key() -> bool:
    """Whether wandb could authenticate: WANDB_API_KEY or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(Callback):
    """Per epoch: train/val loss and accuracy, val macro F1 and each param group's lr. At the
    end: a per-class metrics table and the confusion matrix of the last validation pass.

    The run's config holds the strategy, the backbone and the train config (plus `config`).
    `mode`: "online", "offline" or "disabled"; None means WANDB_MODE if set, else online
    with an API key and offline without. Extra keyword arguments go to `wandb.init`.
    `run`: a run the caller started with `wandb.init`: it gets the config and the logs, and
    finishing it stays the caller's job.
    """

    def __init__(
        self,
        project: str = "finetune",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        settings: Any = None,
        run: Any = None,
        **init_kwargs: Any,
    ) -> None:
        self.project = project
        self.name = name
        self.extra_config = dict(config or {})
        self.mode = mode
        self.settings = settings
        self.init_kwargs = init_kwargs
        self.attached_run = run
        self.run: Any = None
        self.run_dir: str | None = None
        self._warned = False

    # -- events -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer) -> None:
        self.run = self._init(trainer)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._call("log", epoch_row(metrics))

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        report = trainer.state.val_report
        if report is not None:
            self._call("log", self._final_tables(report))
            self._call("summary.update", {"final/val_accuracy": report.accuracy,
                                          "final/val_macro_f1": report.macro_f1})
        self._finish(exit_code=0)

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._finish(exit_code=1)

    # -- wandb calls --------------------------------------------------------------------------
    def run_config(self, trainer: Trainer) -> dict[str, Any]:
        backbone = trainer.backbone
        return {
            "strategy": {**trainer.strategy.state_dict(), "describe": trainer.strategy.describe()},
            "backbone": {"name": backbone.name, "num_classes": backbone.num_classes,
                         "weights": backbone.weights, "groups": backbone.group_names},
            "train": attrs.asdict(trainer.config),
            "runtime": {"device": str(trainer.state.device), "precision": trainer.state.precision,
                        "channels_last": trainer.state.channels_last,
                        "freeze": str(trainer.state.freeze_report)},
            "classes": list(trainer.classes or []),
            **self.extra_config,
        }

    def _init(self, trainer: Trainer) -> Any:
        if self.attached_run is not None:
            try:
                self.attached_run.config.update(self.run_config(trainer), allow_val_change=True)
            except Exception as error:  # wandb trouble never stops training
                self._warn(f"wandb config update failed ({error}); logging continues.")
            return self.attached_run
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or (
            "online" if has_api_key() else "offline")
        kwargs = {"project": self.project, "name": self.name, "config": self.run_config(trainer),
                  "mode": mode, **self.init_kwargs}
        if self.settings is not None:
            kwargs["settings"] = self.settings
        try:
            return wandb.init(**kwargs)
        except Exception as error:
            if mode == "offline":
                self._warn(f"wandb.init failed ({error}); training continues without logging.")
                return None
            self._warn(f"wandb.init failed ({error}); retrying offline.")
            try:
                return wandb.init(**{**kwargs, "mode": "offline"})
            except Exception as again:
                self._warn(f"offline wandb.init failed too ({again}); logging disabled.")
                return None

    def _final_tables(self, report: EvaluationReport) -> dict[str, Any]:
        import wandb

        rows = [[name, float(report.recall[i]), float(report.precision[i]),
                 float(report.recall[i]), float(report.f1[i]), int(report.support[i])]
                for i, name in enumerate(report.classes)]
        matrix = report.confusion_matrix
        k = len(report.classes)
        y_true = np.repeat(np.arange(k).repeat(k), matrix.ravel())
        y_pred = np.repeat(np.tile(np.arange(k), k), matrix.ravel())
        return {
            "per_class": wandb.Table(columns=PER_CLASS_COLUMNS, data=rows),
            "confusion_matrix": wandb.plot.confusion_matrix(
                y_true=y_true.tolist(), preds=y_pred.tolist(), class_names=list(report.classes)),
        }

    def _call(self, method: str, *args: Any) -> None:
        """Call `self.run.<method>`, turning any wandb failure into a single warning."""
        if self.run is None:
            return
        target = self.run
        try:
            for part in method.split("."):
                target = getattr(target, part)
            target(*args)
        except Exception as error:
            self._warn(f"wandb {method} failed ({error}); training continues.", once=True)

    def _finish(self, exit_code: int) -> None:
        if self.run is None or self.run is self.attached_run:
            self.run = None
            return
        run, self.run = self.run, None
        offline = False
        try:
            self.run_dir = str(run.settings.sync_dir)
            offline = bool(run.settings._offline)
        except Exception:
            self.run_dir = None
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            self._warn(f"wandb finish failed ({error}).")
        if offline and self.run_dir:
            print(f"wandb: offline run written to {self.run_dir}\n"
                  f"wandb: upload it with: wandb sync {self.run_dir}", file=sys.stderr)

    def _warn(self, message: str, once: bool = False) -> None:
        if not (once and self._warned):
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._warned = self._warned or once
