"""Console output for a run: one line per epoch, what the strategy trains, or progress bars;
and a console that survives class names its encoding cannot show."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from finetune.callbacks.progress import ProgressBar
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.trainer import Trainer


def tolerate_unencodable_output() -> None:
    """Print what the terminal's encoding cannot show as `\\xe9` escapes instead of failing: a
    class named 'café' must not crash a finished run at its last print (LANG=C, a pipe on
    Windows). Only streams still in the default strict mode are changed."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure) and getattr(stream, "errors", None) == "strict":
            reconfigure(errors="backslashreplace")


class EpochLines(Callback):
    """One printed line per epoch: a readable log where progress bars would only garble a
    file or CI output."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self._started = 0.0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        parts = [f"epoch {int(metrics['epoch']) + 1}/{trainer.config.epochs}"]
        for split in ("train", "val"):
            if f"{split}_loss" in metrics:
                parts.append(f"{split} loss {metrics[f'{split}_loss']:.4f} "
                             f"acc {metrics[f'{split}_accuracy']:.4f}")
        parts.append(f"{time.perf_counter() - self._started:.1f} s")
        print(" · ".join(parts), file=self.stream or sys.stdout, flush=True)


class FreezeReportLines(Callback):
    """Prints what the strategy leaves trainable when fit starts (`at_start`) and again at
    each epoch where a scheduled strategy changes it, so a log shows when groups unfroze."""

    def __init__(self, at_start: bool = True, stream: Any = None) -> None:
        self.at_start = at_start
        self.stream = stream
        self._report: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._report = trainer.state.freeze_report
        if self.at_start:
            self._print(f"strategy: {trainer.strategy.describe()}\n  {self._report}")

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        report = trainer.state.freeze_report
        if report != self._report:
            self._print(f"epoch {epoch + 1}: {report}")
        self._report = report

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)


def progress_callback(stream: Any = None) -> Callback:
    """Progress bars on a terminal, one line per epoch otherwise."""
    out = stream or sys.stderr
    return ProgressBar() if getattr(out, "isatty", lambda: False)() else EpochLines()
