"""What a run produces and what callbacks may read: `StepOutput`, `History`, `TrainState`."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from finetune.stats.metrics import EvaluationReport
from finetune.strategies import FreezeReport


@attrs.define
class StepOutput:
    """What one training batch produced (passed to `on_train_batch_end`); `stepped`: the
    optimizer stepped after it (always, unless gradients are accumulated)."""

    loss: float
    correct: int
    count: int
    stepped: bool = True

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


@attrs.define
class History:
    """One row of metrics per finished epoch; `history["val_accuracy"]` is a column."""

    records: list[dict[str, float]] = attrs.Factory(list)
    stopped_early: bool = False

    def __getitem__(self, metric: str) -> list[float]:
        return [row[metric] for row in self.records if metric in row]

    def __len__(self) -> int:
        return len(self.records)

    def best(self, metric: str, mode: str = "max") -> dict[str, float]:
        """The row where `metric` was best."""
        rows = [row for row in self.records if metric in row]
        if not rows:
            raise KeyError(f"no epoch recorded '{metric}'")
        pick = max if mode == "max" else min
        return pick(rows, key=lambda row: row[metric])

    def to_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(records=[dict(r) for r in data["records"]],
                   stopped_early=bool(data["stopped_early"]))


@attrs.define
class TrainState:
    """Mutable run state that callbacks may read (and `should_stop`, which they may set).

    `batch` is the batch's index in its epoch; `global_step` counts optimizer steps over the
    run (one per batch unless `accumulate_steps` > 1) and drives per-step lr schedules."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    start_epoch: int = 0
    batches_per_epoch: int | None = None
    should_stop: bool = False
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    freeze_report: FreezeReport | None = None
    cached_prefix: str | None = None  # last module of the prefix whose activations are cached
    uncached_reason: str | None = None  # why the training pass runs the whole model, if it does
    malloc_tuned: bool = False  # keep_freed_memory() is in effect for this fit (CPU, glibc)
    val_report: EvaluationReport | None = None
    history: History = attrs.Factory(History)
