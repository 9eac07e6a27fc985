"""Learning-rate search on validation data: a log-spaced grid, successive halving, and a grid
that grows past its edge.

`LrSearch(grid, epochs).run(make_trainer, train_loader, val_loader)` trains candidates that
`make_trainer(lr, activations)` builds and returns what the search saw (`Tuning`) with the
trainer of the chosen lr, trained for all `epochs` — the run `--lr <chosen>` alone would make,
not a copy of it. The test set is no argument, so nothing here can look at it.

How the time is spent:
- Every candidate shares one `ActivationCaches`: a strategy with a frozen prefix runs the
  prefix over the images once for all its candidates (`ActivationCaches.plan` keeps stored
  activations only for a prefix with equal weights, on the same device and precision).
- Successive halving: every candidate trains `rung_epochs` (one) and is scored on validation;
  the best third (rounded down, at least one) goes on to three times as many epochs, and once
  one is left it trains to the end. A candidate goes on from its state held in memory
  (`Trainer.fit(resume=state_dict)`), so the chosen run is the run an uninterrupted fit at
  its lr makes. (A rung shorter than an epoch was tried and dropped: after a third of an
  epoch the larger lr led and then lost at the end, for two of five strategies on UC Merced.)
- Where the first candidate trained on cached activations and training every candidate to
  the end costs at most one more run of the strategy (the fill included) beyond halving, every
  candidate trains all `epochs` and the best final validation accuracy wins: a short rung
  favours the larger lr (freeze-80 on UC Merced led at 1.6e-3 after one epoch and ended 8
  points behind 5e-4), and on cached activations the full answer is cheap.
- Edge of the grid: when the best candidate of the first rung has the smallest or the largest
  lr tried and no other ties its accuracy, the grid grows one step that way
  (`max_extensions` steps per side at most, within `bounds`), so a boundary value is not
  reported as the best without a look past it.

Candidates are ranked by validation accuracy, then by lower validation loss, then by the order
they were tried (the first lr — a preset's — wins a full tie).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from finetune.cache.plan import ActivationCaches
from finetune.train.events import Callback
from finetune.train.trainer import Trainer

MakeTrainer = Callable[[float, ActivationCaches], Trainer]
GRID_STEP = 10 ** 0.5  # two grid points per decade
HALVING = 3  # successive halving keeps the best third and trains it three times as long


def round_lr(lr: float) -> float:
    """An lr as people write it: two significant digits (1.6e-3, not 0.0015811...)."""
    return float(f"{lr:.2g}")


def lr_grid(center: float, points: int = 3, step: float = GRID_STEP) -> tuple[float, ...]:
    """`points` log-spaced lrs around `center` (which is one of them), two per decade."""
    if not (math.isfinite(center) and center > 0) or points < 1:
        raise ValueError(f"an lr grid needs a positive finite centre and points >= 1, got "
                         f"{center} and {points}")
    low = -((points - 1) // 2)
    return tuple(round_lr(center * step ** k) for k in range(low, low + points))


def parse_grid(text: str) -> tuple[float, ...]:
    """`1e-4,3e-4,1e-3` -> (1e-4, 3e-4, 1e-3); refuses what is not a learning rate."""
    values = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"'{item}' in the lr grid is not a number") from None
        if not (math.isfinite(value) and 0 < value < 10):
            raise ValueError(f"{item} in the lr grid is not a learning rate (0 < lr < 10)")
        values.append(value)
    if not values:
        raise ValueError("the lr grid is empty; give learning rates separated by commas")
    return tuple(sorted(set(values)))


@attrs.frozen
class Candidate:
    """One lr tried: its validation accuracy and loss where it stopped, after `epochs`
    epochs (`steps` optimizer steps)."""

    lr: float
    val_accuracy: float
    val_loss: float
    epochs: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Tuning:
    """What a search tried and chose. `seconds`: its wall time, the chosen run's own training
    included; `fill_seconds`: the part spent filling the shared activation cache."""

    parameter: str
    chosen: float
    candidates: tuple[Candidate, ...]
    seconds: float
    schedule: str
    fill_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"parameter": self.parameter, "chosen": self.chosen,
                "candidates": [c.to_dict() for c in self.candidates],
                "seconds": self.seconds, "schedule": self.schedule,
                "fill_seconds": self.fill_seconds}

    def describe(self) -> str:
        tried = ", ".join(f"{c.lr:g}: {100 * c.val_accuracy:.1f}% after {c.epochs} ep"
                          for c in sorted(self.candidates, key=lambda c: c.lr))
        return (f"lr {self.chosen:g}, chosen on validation ({tried}); {self.schedule}; "
                f"{self.seconds:.0f} s in all")


class StopAfterEpochs(Callback):
    """Ends a fit after epoch `epochs` - 1 as a finished epoch, so it can go on later."""

    every_rank = True

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.state.epoch + 1 >= self.epochs:
            trainer.state.should_stop = True


@attrs.define
class _Run:
    lr: float
    order: int
    epochs: int = 0
    steps: int = 0
    val_accuracy: float = -math.inf
    val_loss: float = math.inf
    state: dict[str, Any] | None = None  # held at an epoch's end, to go on from
    trainer: Trainer | None = None  # once it has trained all epochs

    def rank(self) -> tuple[float, float, int]:
        return (-self.val_accuracy, self.val_loss, self.order)

    def record(self) -> Candidate:
        return Candidate(self.lr, self.val_accuracy, self.val_loss, self.epochs, self.steps)


class LrSearch:
    """Chooses a learning rate on validation data; see the module docstring for how.

    `grid`: the lrs to try, the first tried first (put a preset's lr there); `epochs`: the
    length of every run; `rung_epochs`: how long the first rung trains; `step`: the ratio of
    one grid extension (default: the grid's own spacing, else two per decade).
    """

    def __init__(self, grid: Sequence[float], epochs: int, *, rung_epochs: int = 1,
                 max_extensions: int = 2, bounds: tuple[float, float] = (1e-6, 1.0),
                 step: float | None = None) -> None:
        if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
            raise ValueError(f"the lr grid must hold positive learning rates, got {list(grid)}")
        if epochs < 1 or rung_epochs < 1 or max_extensions < 0:
            raise ValueError("epochs and rung_epochs must be >= 1, max_extensions >= 0")
        self.grid = list(dict.fromkeys(grid))
        self.epochs, self.rung_epochs = epochs, rung_epochs
        self.max_extensions, self.bounds = max_extensions, bounds
        ordered = sorted(self.grid)
        spacing = ((ordered[-1] / ordered[0]) ** (1 / (len(ordered) - 1))
                   if len(ordered) > 1 else GRID_STEP)
        self.step = step or (spacing if spacing > 1.01 else GRID_STEP)

    def rungs(self) -> list[int]:
        """How long each rung trains, in epochs: `rung_epochs`, three times as many, …."""
        ladder, epochs = [], self.rung_epochs
        while epochs < self.epochs:
            ladder.append(epochs)
            epochs *= HALVING
        return [*ladder, self.epochs]

    def run(self, make_trainer: MakeTrainer, train_loader: Iterable[Any],
            val_loader: Iterable[Any]) -> tuple[Tuning, Trainer]:
        """(what was tried and chosen, the chosen lr's trainer after all `epochs`)."""
        if val_loader is None:
            raise ValueError("choosing an lr needs validation data: give a val loader "
                             "(e.g. --val-split 0.2)")
        started = time.perf_counter()
        shared = ActivationCaches()
        runs = [_Run(lr, order) for order, lr in enumerate(self.grid)]
        trial = _Trial(make_trainer, shared, train_loader, val_loader, self.epochs)
        try:
            rungs = self.rungs()
            trial.advance(runs[0], rungs[0])
            epoch, others = trial.epoch_seconds, len(runs) - 1
            cheap = trial.cached and others * (self.epochs - 1) * epoch <= (
                self.epochs * epoch + shared.fill_seconds)  # at most one run's cost more
            if cheap:
                rungs = [self.epochs]
            alive = list(runs)
            for index, until in enumerate(rungs):
                for run in alive:
                    trial.advance(run, until)
                if index == 0:
                    alive += self._extend(runs, until, trial)
                alive.sort(key=_Run.rank)
                if until >= self.epochs:
                    break
                alive = alive[:max(1, len(alive) // HALVING)]
                if len(alive) == 1:
                    trial.advance(alive[0], self.epochs)
                    break
            chosen = min((r for r in alive if r.trainer is not None), key=_Run.rank)
        finally:
            shared.release()
        schedule = (f"every candidate trained all {self.epochs} epochs on cached activations"
                    if cheap else f"successive halving over epochs {rungs}, the best "
                    f"1/{HALVING} kept at each")
        tuning = Tuning("lr", chosen.lr, tuple(r.record() for r in runs),
                        time.perf_counter() - started, schedule, shared.fill_seconds)
        return tuning, chosen.trainer  # type: ignore[return-value]  # chosen has one

    def _extend(self, runs: list[_Run], until: int, trial: _Trial) -> list[_Run]:
        """Grow the grid past an edge that holds the best candidate, one step at a time."""
        added: list[_Run] = []
        for direction in (-1, 1):
            for _ in range(self.max_extensions):
                best, *others = sorted(runs, key=_Run.rank)
                edge = (min if direction < 0 else max)(r.lr for r in runs)
                lr = self._beyond(edge, direction)
                if (best.lr != edge or not self.bounds[0] <= lr <= self.bounds[1]
                        or any(r.val_accuracy >= best.val_accuracy for r in others)):
                    break  # an edge that wins outright on accuracy, not on a tie
                run = _Run(lr, len(runs))
                trial.advance(run, until)
                runs.append(run)
                added.append(run)
        return added


    def _beyond(self, edge: float, direction: int) -> float:
        """The next lr past `edge` on the grid's lattice: the first lr times whole powers of
        the step, rounded (5e-4 -> 1.6e-3 -> 5e-3 -> 1.6e-2, never 5.1e-3)."""
        anchor = self.grid[0]
        power = round(math.log(edge / anchor) / math.log(self.step)) + direction
        return round_lr(anchor * self.step ** power)


class _Trial:
    """Trains one candidate on to a rung: from its held state, or from the start."""

    def __init__(self, make_trainer: MakeTrainer, shared: ActivationCaches,
                 train_loader: Iterable[Any], val_loader: Iterable[Any], epochs: int) -> None:
        self.make_trainer, self.shared = make_trainer, shared
        self.train_loader, self.val_loader, self.epochs = train_loader, val_loader, epochs
        self.cached, self.epoch_seconds = False, math.inf  # measured by the first epoch

    def advance(self, run: _Run, until: int) -> None:
        if run.epochs >= until:
            return
        trainer = self.make_trainer(run.lr, self.shared)
        if trainer.config.epochs != self.epochs:
            raise ValueError(f"make_trainer built a trainer for {trainer.config.epochs} "
                             f"epochs; the search runs {self.epochs}")
        if until < self.epochs:
            trainer.callbacks.append(StopAfterEpochs(until))
        history = trainer.fit(self.train_loader, self.val_loader, resume=run.state)
        last = history.records[-1]
        run.epochs, run.steps = int(last["epoch"]) + 1, trainer.state.global_step
        run.val_accuracy, run.val_loss = float(last["val_accuracy"]), float(last["val_loss"])
        if run.order == 0 and len(history) == 1:  # the first epoch of all: what one costs
            self.cached = trainer.state.cached_prefix is not None
            self.epoch_seconds = max(0.0, last["epoch_seconds"] - last["cache_fill_seconds"])
        if run.epochs >= self.epochs:
            run.state, run.trainer = None, trainer
        else:
            run.state = trainer.state_dict()
