"""`PerClassEvaluation`: per-class accuracy, precision, recall, F1, support and the
confusion matrix of the validation set, as a text table and a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.stats.metrics import EvaluationReport
    from finetune.train.trainer import History, Trainer


class PerClassEvaluation(Callback):
    """Record the validation report; at the end (and each epoch if `every_epoch`) print its
    table to `stream` and, with `output_dir`, save `confusion_matrix.png` and
    `per_class.json` there (per-epoch PNGs as `confusion_matrix_epoch{N}.png`).

    Uses the Trainer's validation pass — it runs no loop of its own — so it needs a
    validation loader. The final report is `self.report` afterwards.
    """

    def __init__(
        self, output_dir: str | Path | None = None, every_epoch: bool = False,
        stream: TextIO | None = None, normalize: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.every_epoch = every_epoch
        self.stream = stream
        self.normalize = normalize
        self.report: EvaluationReport | None = None
        self.epoch_reports: list[EvaluationReport] = []

    def on_validation_end(self, trainer: Trainer, report: EvaluationReport) -> None:
        self.report = report
        if self.every_epoch:
            self.epoch_reports.append(report)
            self._emit(report, f"epoch {trainer.state.epoch + 1}",
                       f"confusion_matrix_epoch{trainer.state.epoch + 1}.png")

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        if self.report is None:
            return
        self._emit(self.report, "final", "confusion_matrix.png")
        if self.output_dir is not None:
            (self.output_dir / "per_class.json").write_text(
                json.dumps(self.report.to_dict(), indent=2))

    def _emit(self, report: EvaluationReport, title: str, png_name: str) -> None:
        stream = self.stream or sys.stdout
        print(f"per-class validation metrics ({title}):\n{report.table()}", file=stream)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            report.plot_confusion_matrix(self.output_dir / png_name, normalize=self.normalize)
