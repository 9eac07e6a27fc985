"""`ProgressBar`: a tqdm bar over epochs and one over each epoch's batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.stats.metrics import EvaluationReport
    from finetune.train.trainer import History, StepOutput, Trainer


class ProgressBar(Callback):
    """Epoch and batch bars with the running loss and accuracy in the postfix.

    `quiet_if_not_tty=True` hides the bars when output is not a terminal (CI logs, nohup);
    `leave` keeps finished batch bars on screen."""

    def __init__(self, quiet_if_not_tty: bool = False, leave: bool = False) -> None:
        self.disable: bool | None = None if quiet_if_not_tty else False
        self.leave = leave
        self.epoch_bar: Any = None
        self.batch_bar: Any = None
        self._loss = 0.0
        self._correct = 0
        self._count = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.epoch_bar = tqdm(
            total=trainer.config.epochs, initial=trainer.state.start_epoch, desc="epochs",
            unit="epoch", disable=self.disable, dynamic_ncols=True,
        )

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._loss, self._correct, self._count = 0.0, 0, 0
        self.batch_bar = tqdm(
            total=trainer.state.batches_per_epoch, unit="batch",
            desc=f"epoch {epoch + 1}/{trainer.config.epochs}", leave=self.leave,
            disable=self.disable, dynamic_ncols=True,
        )

    def on_train_batch_end(self, trainer: Trainer, batch: Any, outputs: StepOutput) -> None:
        self._loss += outputs.loss * outputs.count
        self._correct += outputs.correct
        self._count += outputs.count
        if self.batch_bar is not None:
            self.batch_bar.update(1)
            self.batch_bar.set_postfix(loss=f"{self._loss / self._count:.4f}",
                                       acc=f"{self._correct / self._count:.3f}", refresh=False)

    def on_validation_end(self, trainer: Trainer, report: EvaluationReport) -> None:
        if self.batch_bar is not None:
            self.batch_bar.set_postfix(
                loss=f"{self._loss / max(self._count, 1):.4f}",
                val_loss=f"{report.loss or 0.0:.4f}", val_acc=f"{report.accuracy:.3f}",
            )

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._close_batch_bar()
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)
            shown = {k: f"{metrics[k]:.4f}" for k in
                     ("train_loss", "train_accuracy", "val_loss", "val_accuracy") if k in metrics}
            self.epoch_bar.set_postfix(shown)

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._close()

    def _close_batch_bar(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.close()
            self.batch_bar = None

    def _close(self) -> None:
        self._close_batch_bar()
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None
