"""Learning-rate search on validation data: a log-spaced grid, each lr raced against the best
run so far, and a grid that grows past a winning edge.

`LrSearch(grid, epochs).run(make_trainer, train_loader, val_loader)` trains candidates that
`make_trainer(lr, activations)` builds and returns what the search saw (`Tuning`) with the
trainer of the chosen lr, trained for all `epochs` — an uninterrupted fit at that lr, the very
run `--lr <chosen>` alone makes. The test set is no argument, so nothing here can look at it.

How it spends time, and why it cannot choose worse than the first lr:
- The first lr of the grid (a preset's) trains all `epochs`; its validation accuracy and loss
  are recorded at a third of the first epoch (a peek that leaves the run as it was: the
  random state is restored after it) and at every epoch's end. It is the best run so far.
- Every other lr races that record: it trains with the same peeks and goes on only while
  it leads the best run at the same point (at the peek: higher accuracy, or the same with
  lower loss; at an epoch's end: higher accuracy). One that finishes more accurate becomes
  the best run. A poor lr thus costs a third of an epoch, a good one what it takes to prove
  itself, and the chosen run's final validation accuracy is never below the first lr's. (A
  late starter that would only overtake in the last epoch is stopped: the search errs
  towards the first lr, never below it.)
- Every candidate shares one `ActivationCaches`: a strategy with a frozen prefix runs the
  prefix over the images once for all of them (`ActivationCaches.plan` keeps activations only
  for a prefix with equal weights, on the same device and precision).
- Edge of the grid: while the best run has the smallest or largest lr tried, the grid grows
  one step that way (`max_extensions` steps per side at most, within `bounds`), so a boundary
  value is not reported as the best without a look past it.

Successive halving (all candidates one epoch, the best third on) was measured first: on UC
Merced's quick comparison it cost 1.50x the untuned run, and after one epoch freeze-80 led at
1.6e-3 and ended 8 points behind 5e-4 — a short rung favours the larger lr, where a race only
lets a leader run on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch

from finetune.cache.plan import ActivationCaches
from finetune.runtime import distributed
from finetune.train.events import Callback, StopFit
from finetune.train.trainer import Trainer

MakeTrainer = Callable[[float, ActivationCaches], Trainer]
# Under torchrun, one process in about eight aborted in gloo ("terminate called without an
# active exception") in a search whose candidates stop mid-epoch; until that is understood the
# search runs in one process.
SINGLE_PROCESS = ("the lr search runs in one process for now (a data-parallel search aborted "
                  "intermittently); choose the lr without torchrun (finetune train --lr auto, "
                  "or benchmarks.compare without --nproc), then train under torchrun with that "
                  "--lr (compare: --tune none --lr X)")
GRID_STEP = 10 ** 0.5  # two grid points per decade
PEEK = 1 / 3  # of the first epoch: where a poor lr is first compared and stopped
Score = tuple[float, float]  # (validation accuracy, validation loss)


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


def search_grid(lr: float, grid: Sequence[float] | None = None) -> tuple[float, ...]:
    """The lrs a search tries: `lr` first (trained in full first, and it wins a full tie),
    then `grid` (default: `lr`'s neighbours) in ascending order."""
    rest = sorted(set(grid) if grid else set(lr_grid(lr)))
    return (lr, *(value for value in rest if value != lr))


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


def ahead(ours: Score, theirs: Score) -> bool:
    """Higher validation accuracy, or the same with lower validation loss."""
    return ours[0] > theirs[0] or (ours[0] == theirs[0] and ours[1] < theirs[1])


@attrs.frozen
class Candidate:
    """One lr tried: its validation accuracy and loss where it stopped, after `epochs`
    epochs (a fraction where it stopped at the first peek) and `steps` optimizer steps."""

    lr: float
    val_accuracy: float
    val_loss: float
    epochs: float
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
        tried = ", ".join(f"{c.lr:g}: {100 * c.val_accuracy:.1f}% after {c.epochs:.2g} ep"
                          for c in sorted(self.candidates, key=lambda c: c.lr))
        return f"lr {self.chosen:g}, chosen on validation ({tried}); {self.seconds:.0f} s in all"


class Behind(StopFit):
    """A raced candidate did not lead at the peek: its fit ends there."""


@attrs.define
class _Run:
    """A candidate's record: its score at each point (the peek, then each epoch's end)."""

    lr: float
    scores: dict[float, Score] = attrs.field(factory=dict)
    steps: int = 0
    trainer: Trainer | None = None  # set once it has trained all epochs

    @property
    def last(self) -> tuple[float, Score]:
        point = max(self.scores)
        return point, self.scores[point]

    def record(self) -> Candidate:
        point, (accuracy, loss) = self.last
        return Candidate(self.lr, accuracy, loss, round(point, 3), self.steps)


class Race(Callback):
    """Scores a fit on validation at a peek in the first epoch and at each epoch's end, and
    stops it as soon as it does not lead `rival` at the same point. The peek runs under a
    forked random state, so a fit that goes on is the fit it would have been without it."""

    every_rank = True  # every process peeks and stops at the same step

    def __init__(self, run: _Run, val_loader: Iterable[Any], rival: _Run | None,
                 peek: float) -> None:
        self.run, self.val_loader, self.rival, self.peek = run, val_loader, rival, peek
        self.peek_step = 0

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch == 0 and trainer.state.batches_per_epoch:
            steps = math.ceil(trainer.state.batches_per_epoch / trainer.config.accumulate_steps)
            self.peek_step = max(1, round(self.peek * steps)) if steps > 1 else 0

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        if step != self.peek_step or trainer.state.epoch != 0:
            return
        device = trainer.state.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            report = trainer.evaluate(self.val_loader)
        if self._judge(self.peek, (report.accuracy, float(report.loss or 0.0)), trainer):
            raise Behind(f"lr {self.run.lr:g} is behind at {self.peek:.2g} of an epoch")

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        score = (float(metrics["val_accuracy"]), float(metrics["val_loss"]))
        if self._judge(float(trainer.state.epoch + 1), score, trainer):
            trainer.state.should_stop = True

    def _judge(self, point: float, score: Score, trainer: Any) -> bool:
        """Record `score` at `point`; whether the run fails to lead its rival there. At the
        peek a tie in accuracy goes to the lower loss (after a few steps accuracy is coarse);
        at an epoch's end it stops the run: models at chance differ in loss only by how near
        uniform their output is, and would otherwise each train in full."""
        self.run.scores[point] = score
        self.run.steps = trainer.state.global_step
        theirs = self.rival.scores.get(point) if self.rival is not None else None
        if theirs is None:
            return False
        return not ahead(score, theirs) if point < 1 else score[0] <= theirs[0]


class LrSearch:
    """Chooses a learning rate on validation data; see the module docstring for how.

    `grid`: the lrs to try, the first trained in full first (put a preset's lr there);
    `epochs`: the length of every run; `peek`: where in the first epoch a candidate is first
    compared; `step`: the ratio of one grid extension (default: the grid's own spacing, else
    two per decade).
    """

    def __init__(self, grid: Sequence[float], epochs: int, *, peek: float = PEEK,
                 max_extensions: int = 2, bounds: tuple[float, float] = (1e-6, 1.0),
                 step: float | None = None) -> None:
        if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
            raise ValueError(f"the lr grid must hold positive learning rates, got {list(grid)}")
        if epochs < 1 or not 0 < peek < 1 or max_extensions < 0:
            raise ValueError("epochs must be >= 1, 0 < peek < 1 and max_extensions >= 0")
        self.grid = list(dict.fromkeys(grid))
        self.epochs, self.peek = epochs, peek
        self.max_extensions, self.bounds = max_extensions, bounds
        ordered = sorted(self.grid)
        spacing = ((ordered[-1] / ordered[0]) ** (1 / (len(ordered) - 1))
                   if len(ordered) > 1 else GRID_STEP)
        self.step = step or (spacing if spacing > 1.01 else GRID_STEP)

    def run(self, make_trainer: MakeTrainer, train_loader: Iterable[Any],
            val_loader: Iterable[Any], activations: ActivationCaches | None = None
            ) -> tuple[Tuning, Trainer]:
        """(what was tried and chosen, the chosen lr's trainer after all `epochs`).
        `activations`: a cache the caller holds (and releases) — the advisor's, filled at
        several depths — instead of one of the search's own."""
        if val_loader is None:
            raise ValueError("choosing an lr needs validation data: give a val loader "
                             "(e.g. --val-split 0.2)")
        if distributed.world_size() > 1:
            raise ValueError(SINGLE_PROCESS)
        started = time.perf_counter()
        shared = activations if activations is not None else ActivationCaches()
        filled = shared.fill_seconds

        def race(lr: float, rival: _Run | None) -> _Run:
            run = _Run(lr)
            trainer = make_trainer(lr, shared)
            if trainer.config.epochs != self.epochs:
                raise ValueError(f"make_trainer built a trainer for {trainer.config.epochs} "
                                 f"epochs; the search runs {self.epochs}")
            trainer.callbacks.append(Race(run, val_loader, rival, self.peek))
            try:
                trainer.fit(train_loader, val_loader)
            except Behind:
                return run
            if max(run.scores) >= self.epochs:
                run.trainer = trainer
            return run

        def contest(lr: float, best: _Run) -> _Run:
            run = race(lr, best)
            tried.append(run)
            leads = run.trainer is not None and run.last[1][0] > best.last[1][0]
            return run if leads else best

        try:
            best = race(self.grid[0], None)
            tried = [best]
            for lr in self.grid[1:]:
                best = contest(lr, best)
            for direction in (-1, 1):  # past the edge the best run holds, while it holds it
                for _ in range(self.max_extensions):
                    edge = (min if direction < 0 else max)(r.lr for r in tried)
                    lr = self._beyond(edge, direction)
                    if best.lr != edge or not self.bounds[0] <= lr <= self.bounds[1]:
                        break
                    best = contest(lr, best)
        finally:
            if activations is None:
                shared.release()
        if best.trainer is None:
            raise RuntimeError("the first lr's run did not finish")
        tuning = Tuning("lr", best.lr, tuple(r.record() for r in tried),
                        time.perf_counter() - started,
                        f"each lr raced the best run so far and stopped once it did not "
                        f"lead (at {self.peek:.2g} of the first epoch or an epoch's end)",
                        shared.fill_seconds - filled)
        return tuning, best.trainer

    def _beyond(self, edge: float, direction: int) -> float:
        """The next lr past `edge` on the grid's lattice: the first lr times whole powers of
        the step, rounded (5e-4 -> 1.6e-3 -> 5e-3 -> 1.6e-2, never 5.1e-3)."""
        anchor = self.grid[0]
        power = round(math.log(edge / anchor) / math.log(self.step)) + direction
        return round_lr(anchor * self.step ** power)
