"""`Callback` and the events the Trainer fires.

Each `Event`'s value is the name of the method it calls, so dispatch is one `getattr` and a
callback overrides only the hooks it needs. What a callback may change is defined per event
(each hook's docstring, and the table in docs/callbacks.md); everywhere it may end the run:
`trainer.state.should_stop = True` ends it after the current epoch (early stopping, a
completed run), and raising `StopFit` ends it at once (a run that must not count).
"""

from __future__ import annotations

import enum
import warnings
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError
from finetune.runtime.distributed import is_main

if TYPE_CHECKING:
    from finetune.stats.metrics import EvaluationReport
    from finetune.train.trainer import History, StepOutput, Trainer


class StopFit(FinetuneError):
    """Raised by a callback to end `fit` at once: `on_exception` fires and `fit` re-raises,
    so the run is reported as stopped, never as finished."""


class Event(str, enum.Enum):
    """Training events, in the order they fire (see docs/callbacks.md for the table)."""

    FIT_START = "on_fit_start"
    EPOCH_START = "on_epoch_start"
    OPTIMIZER_STEP = "on_optimizer_step"
    TRAIN_BATCH_END = "on_train_batch_end"
    VALIDATION_START = "on_validation_start"
    VALIDATION_END = "on_validation_end"
    EPOCH_END = "on_epoch_end"
    FIT_END = "on_fit_end"
    EXCEPTION = "on_exception"


class Callback:
    """No-op hooks. Stateful callbacks override `state_dict` / `load_state_dict` so a resumed
    run continues with, e.g., the same best score and patience counter."""

    every_rank: bool = False  # under data-parallel training only rank 0 gets events

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume has been restored)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """The strategy for `epoch` is applied and the optimizer matches it. May change the
        optimizer's param-group hyper-parameters for this epoch (they are rebuilt from the
        strategy when it changes what trains)."""

    def on_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """Right after optimizer step `step` (`trainer.state.global_step` counts it). May
        update state kept beside the weights — an average of them (EMA), a probe of the
        gradients — but not the trained weights themselves."""

    def on_train_batch_end(
        self, trainer: Trainer, batch: Any, outputs: StepOutput
    ) -> None:
        """After each training batch; `outputs` holds its loss and correct count, and
        `stepped` (the optimizer stepped after it: always unless gradients accumulate).
        Observes only."""

    def on_validation_start(self, trainer: Trainer) -> None:
        """Before an epoch's validation pass (not fired without a validation loader). May
        swap other weights into `trainer.backbone` for the pass (an EMA's), provided
        `on_validation_end` swaps the trained ones back."""

    def on_validation_end(self, trainer: Trainer, report: EvaluationReport) -> None:
        """After the validation pass of an epoch (not fired without a validation loader).
        Must restore any weights `on_validation_start` swapped in."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the epoch's training, validation and scheduler step; `metrics` is the row
        just appended to the history (train_loss, train_accuracy, val_loss, …, lr/<group>).
        May add entries to `metrics` (later callbacks and the history see them) and set
        `trainer.state.should_stop`."""

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        """After the last epoch, or after an early stop."""

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        """The run failed (non-finite loss, Ctrl-C, …); the error is re-raised afterwards."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def dispatch(callbacks: list[Callback], event: Event, trainer: Trainer, **kwargs: Any) -> None:
    """Call `event` on each callback, in list order: on rank 0 alone under data-parallel
    training (the others write nothing), except callbacks marked `every_rank`."""
    for callback in listeners(callbacks):
        getattr(callback, event.value)(trainer, **kwargs)


def callback_keys(callbacks: list[Callback]) -> list[str]:
    """Stable names for callback state in checkpoints: the class name, numbered if repeated."""
    keys, seen = [], {}
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def notify_exception(callbacks: list[Callback], trainer: Trainer, error: BaseException) -> None:
    """`on_exception` on every callback this process notifies; one that fails is warned
    about, since the original error matters more and every callback must get its chance to
    clean up."""
    for callback in listeners(callbacks):
        try:
            callback.on_exception(trainer, error)
        except Exception as inner:
            warnings.warn(f"{type(callback).__name__}.on_exception failed: {inner}",
                          RuntimeWarning, stacklevel=3)


def listeners(callbacks: list[Callback]) -> list[Callback]:
    """The callbacks this process notifies: all of them on rank 0 (or a single process)."""
    return callbacks if is_main() else [c for c in callbacks if c.every_rank]
