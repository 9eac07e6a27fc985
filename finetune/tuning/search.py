"""Learning-rate search on validation data: a log-spaced grid, each lr raced against the best
run so far on the same validation images, and a grid that grows past a winning edge.

`LrSearch(grid, epochs).run(make_trainer, train_loader, val_loader)` trains candidates that
`make_trainer(change, activations)` builds (its config passed through `change`, which sets
the candidate's lr) and returns what the search saw (`Tuning`) with the
trainer of the chosen lr, trained for all `epochs` — an uninterrupted fit at that lr, the very
run `--lr <chosen>` alone makes. The test set is no argument, so nothing here can look at it.

A search is a space and a stopping rule:
- The space: the first lr of the grid (a preset's) trains all `epochs` first; every other lr
  races the best run so far; while the best run has the smallest or largest lr tried, the grid
  grows one step that way (`max_extensions` per side, within `bounds`), so a boundary value
  is not reported as the best without a look past it.
- Scores: every candidate is validated at a third of the first epoch (a peek that leaves the
  run as it was: the random state is forked) and at each epoch's end, keeping each image's
  cross-entropy and whether it was right (`Score`).
- The stopping rule (`Selection.behind`): a challenger stops only when it is behind the best
  run at the same point beyond noise — the paired per-image differences on the same images
  average worse by more than `stop_z` (1) standard errors. A tie goes on; so does one image's
  dip.
- The choice (`Selection.better`): a run that finished replaces the best run when it is ahead
  by the criterion by more than `switch_z` (1.64) standard errors (default criterion:
  validation cross-entropy, a proper scoring rule that still separates candidates where 60
  images make accuracy move in 1.7-point steps and saturate near the top; measured against
  accuracy and accuracy-then-loss, and each bound against others, in docs/benchmarks.md).
  Where nothing is ahead beyond noise the first lr (a preset's) stays.
- Every candidate shares one `ActivationCaches`: a strategy with a frozen prefix runs the
  prefix over the images once for all of them (`ActivationCaches.plan` keeps activations only
  for a prefix with equal weights, on the same device and precision).

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
import numpy as np
import torch

from finetune.cache.plan import ActivationCaches
from finetune.runtime import distributed
from finetune.stats.metrics import EvaluationReport
from finetune.train.config import TrainConfig
from finetune.train.events import Callback, StopFit
from finetune.train.step import NonFiniteLossError
from finetune.train.trainer import Trainer

# A candidate's config from the caller's: what the space varies, set to the candidate's value.
ConfigChange = Callable[[TrainConfig], TrainConfig]
# make_trainer(change, activations): the caller's trainer with `change(config)` as its config,
# sharing the search's activation cache
MakeTrainer = Callable[[ConfigChange, ActivationCaches], Trainer]


def same_config(config: TrainConfig) -> TrainConfig:
    """The change that changes nothing (a run outside any search)."""
    return config


GRID_STEP = 10 ** 0.5  # two grid points per decade
PEEK = 1 / 3  # of the first epoch: where a poor lr is first compared and stopped
SELECTIONS = ("loss", "accuracy+loss", "accuracy")
# In standard errors of the paired per-image differences (docs/benchmarks.md measured both):
STOP_Z = 1.0  # behind by more: a challenger stops (no choice changed from 0 to 1.64; cost did)
SWITCH_Z = 1.64  # ahead by more, 95% one-sided: a finisher replaces the best run
WORST_LOSS = 1e4  # an image's cross-entropy where a diverged model gives NaN or inf


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


def ahead(ours: tuple[float, float], theirs: tuple[float, float]) -> bool:
    """Higher accuracy, or the same with lower loss: (accuracy, loss) pairs."""
    return ours[0] > theirs[0] or (ours[0] == theirs[0] and ours[1] < theirs[1])


@attrs.frozen(eq=False)
class Score:
    """A candidate's validation at one point: each image's cross-entropy and whether it was
    right, in the validation loader's order (the same images for every candidate)."""

    losses: np.ndarray
    correct: np.ndarray

    @classmethod
    def of(cls, report: EvaluationReport) -> Score:
        if report.losses is None or report.predictions is None or report.targets is None:
            raise ValueError("a search scores reports that keep per-image losses and "
                             "predictions (Trainer.evaluate's do)")
        losses = np.asarray(report.losses, dtype=np.float64)  # a NaN or inf is the worst
        return cls(np.nan_to_num(losses, nan=WORST_LOSS, posinf=WORST_LOSS),
                   np.asarray(report.predictions == report.targets))

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


@attrs.frozen
class Selection:
    """How a search compares two candidates on the same validation images.

    `criterion` orders finished runs: "loss" (mean cross-entropy, lower wins), "accuracy"
    (higher wins; a tie keeps the run found first), "accuracy+loss" (accuracy, a tie going to
    the lower loss). Noise is measured in standard errors of the paired per-image
    differences — in cross-entropy for "loss", in right-or-wrong for the accuracy criteria: a
    challenger behind by more than `stop_z` stops, and a finisher must be ahead by more than
    `switch_z` to replace the best run (None: ahead at all). On 40-84 validation images a
    challenger better only within noise is as likely worse on test (docs/benchmarks.md)."""

    criterion: str = attrs.field(default="loss", validator=attrs.validators.in_(SELECTIONS))
    stop_z: float = attrs.field(default=STOP_Z, validator=attrs.validators.ge(0))
    switch_z: float | None = attrs.field(default=SWITCH_Z)

    def better(self, ours: Score, theirs: Score) -> bool:
        """Whether `ours` beats `theirs` by the criterion (a tie does not), beyond noise
        unless `switch_z` is None."""
        if self.switch_z is not None and not self.behind(theirs, ours, self.switch_z):
            return False
        if self.criterion == "loss":
            return ours.loss < theirs.loss
        if self.criterion == "accuracy":
            return ours.accuracy > theirs.accuracy
        return ahead((ours.accuracy, ours.loss), (theirs.accuracy, theirs.loss))

    def behind(self, ours: Score, theirs: Score, z: float | None = None) -> bool:
        """Whether `ours` is behind `theirs` beyond noise: the mean per-image difference is
        worse by more than `z` (default `stop_z`) of its standard errors (a one-image dip is
        not)."""
        if len(ours.losses) != len(theirs.losses):
            raise ValueError("two candidates were scored on different validation images")
        if self.criterion == "loss":
            worse = ours.losses - theirs.losses
        else:
            worse = theirs.correct.astype(np.float64) - ours.correct.astype(np.float64)
        mean = float(worse.mean())
        if mean <= 0:
            return False
        error = float(worse.std(ddof=1)) / math.sqrt(len(worse)) if len(worse) > 1 else 0.0
        return mean > (self.stop_z if z is None else z) * error


@attrs.frozen
class Candidate:
    """One value tried: its validation accuracy and loss where it stopped, after `epochs`
    epochs (a fraction where it stopped at the first peek) and `steps` optimizer steps;
    `diverged` where its training loss became NaN or infinite (no score before that: None)."""

    value: float
    val_accuracy: float | None
    val_loss: float | None
    epochs: float
    steps: int
    diverged: bool = False

    @property
    def lr(self) -> float:
        """The value of an lr search (its records name it `lr`)."""
        return self.value

    def to_dict(self, parameter: str = "lr") -> dict[str, Any]:
        """Under the searched setting's name: `{"lr": 1e-3, ...}`."""
        record = attrs.asdict(self)
        return {parameter: record.pop("value"), **record}


@attrs.frozen
class Tuning:
    """What a search tried and chose. `seconds`: its wall time, the chosen run's own training
    included; `fill_seconds`: the part spent filling the shared activation cache; `select`:
    the criterion it chose by."""

    parameter: str
    chosen: float
    candidates: tuple[Candidate, ...]
    seconds: float
    schedule: str
    fill_seconds: float = 0.0
    select: str = "loss"

    def to_dict(self) -> dict[str, Any]:
        return {"parameter": self.parameter, "chosen": self.chosen, "select": self.select,
                "candidates": [c.to_dict(self.parameter) for c in self.candidates],
                "seconds": self.seconds, "schedule": self.schedule,
                "fill_seconds": self.fill_seconds}

    def describe(self) -> str:
        tried = ", ".join(
            f"{c.value:g}: diverged" if c.val_accuracy is None or c.val_loss is None else
            f"{c.value:g}: {100 * c.val_accuracy:.1f}% / loss {c.val_loss:.3g} after "
            f"{c.epochs:.2g} ep{' (then diverged)' if c.diverged else ''}"
            for c in sorted(self.candidates, key=lambda c: c.value))
        return (f"{self.parameter} {self.chosen:g}, chosen on validation by {self.select} "
                f"({tried}); {self.seconds:.0f} s in all")


class Behind(StopFit):
    """A raced candidate is behind beyond noise at the peek: its fit ends there."""


@attrs.define
class _Run:
    """A candidate's record: its score at each point (the peek, then each epoch's end)."""

    value: float
    scores: dict[float, Score] = attrs.field(factory=dict)
    steps: int = 0
    trainer: Trainer | None = None  # set once it has trained all epochs
    diverged: bool = False

    @property
    def last(self) -> tuple[float, Score]:
        point = max(self.scores)
        return point, self.scores[point]

    @property
    def reached(self) -> float:
        """How far it trained, in epochs, as far as it was scored (0: never)."""
        return max(self.scores, default=0.0)

    def record(self) -> Candidate:
        if not self.scores:
            return Candidate(self.value, None, None, 0.0, self.steps, diverged=True)
        point, score = self.last
        return Candidate(self.value, score.accuracy, score.loss, round(point, 3), self.steps,
                         self.diverged)


def stops(selection: Selection, run: _Run, point: float, rival: _Run | None) -> bool:
    """Whether `run`, just scored at `point`, stops there: it is behind `rival` at the same
    point beyond noise. Shared by the live race and `benchmarks.selection`'s replay."""
    theirs = rival.scores.get(point) if rival is not None else None
    return theirs is not None and selection.behind(run.scores[point], theirs)


class Race(Callback):
    """Scores a fit on validation at a peek in the first epoch and at each epoch's end, and
    stops it once it is behind `rival` beyond noise at the same point. The peek runs under a
    forked random state, so a fit that goes on is the fit it would have been without it."""

    every_rank = True  # every process peeks and stops at the same step

    def __init__(self, run: _Run, val_loader: Iterable[Any], rival: _Run | None,
                 peek: float, selection: Selection | None = None) -> None:
        self.run, self.val_loader, self.rival, self.peek = run, val_loader, rival, peek
        self.selection = selection or Selection()
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
        if self._judge(self.peek, Score.of(report), trainer):
            raise Behind(f"{self.run.value:g} is behind at {self.peek:.2g} of an epoch")

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        report = trainer.state.val_report
        if report is None:
            raise RuntimeError("the race scores each epoch's validation report")
        if self._judge(float(trainer.state.epoch + 1), Score.of(report), trainer):
            trainer.state.should_stop = True

    def _judge(self, point: float, score: Score, trainer: Any) -> bool:
        """Whether the run stops here: rank 0's verdict on every rank (the scores are
        gathered, so every rank holds the same; the verdict is still taken once, so that no
        rounding difference between machines can send ranks different ways)."""
        self.run.scores[point] = score
        self.run.steps = trainer.state.global_step
        return bool(distributed.same_as_main(stops(self.selection, self.run, point, self.rival)))


@attrs.frozen
class SearchSpace:
    """What a search varies: the setting `name` (a `TrainConfig` field), the `values` to try
    — the first trained in full first (put the preset's there), the rest in ascending order
    — and how a value is applied to a run's config (`apply`; default: set the field). On a
    "log" scale the grid grows past a winning edge by `step` (default: the values' own
    spacing, else two per decade), at most `max_extensions` times a side within `bounds`;
    "listed" tries the values given and no others."""

    name: str
    values: tuple[float, ...] = attrs.field(converter=lambda v: tuple(dict.fromkeys(v)))
    scale: str = attrs.field(default="log", validator=attrs.validators.in_(("log", "listed")))
    step: float | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)
    max_extensions: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    setter: Callable[[TrainConfig, float], TrainConfig] | None = None

    def __attrs_post_init__(self) -> None:
        if not self.values or any(not math.isfinite(v) for v in self.values):
            raise ValueError(f"a search space needs finite values, got {list(self.values)}")
        if self.scale == "log" and any(v <= 0 for v in self.values):
            raise ValueError(f"a log-scale search needs values > 0, got {list(self.values)} "
                             "(use scale='listed' for a grid with 0)")

    def apply(self, value: float) -> ConfigChange:
        """The change that gives a run `value`."""
        if self.setter is not None:
            return lambda config: self.setter(config, value)  # type: ignore[misc]
        return lambda config: attrs.evolve(config, **{self.name: value})

    @property
    def ratio(self) -> float:
        if self.step is not None:
            return self.step
        ordered = sorted(self.values)
        spacing = ((ordered[-1] / ordered[0]) ** (1 / (len(ordered) - 1))
                   if len(ordered) > 1 else GRID_STEP)
        return spacing if spacing > 1.01 else GRID_STEP

    def beyond(self, edge: float, direction: int) -> float | None:
        """The next value past `edge` (None: the space does not grow there): the first value
        times whole powers of the step, rounded (5e-4 -> 1.6e-3 -> 5e-3, never 5.1e-3)."""
        if self.scale != "log":
            return None
        anchor = self.values[0]
        power = round(math.log(edge / anchor) / math.log(self.ratio)) + direction
        value = round_lr(anchor * self.ratio ** power)
        return value if self.bounds[0] <= value <= self.bounds[1] else None


def lr_space(grid: Sequence[float], *, bounds: tuple[float, float] = (1e-6, 1.0),
             step: float | None = None, max_extensions: int = 2) -> SearchSpace:
    """The default space: learning rates on a log grid that grows past a winning edge."""
    if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
        raise ValueError(f"the lr grid must hold positive learning rates, got {list(grid)}")
    return SearchSpace("lr", tuple(grid), step=step, bounds=bounds,
                       max_extensions=max_extensions)


class Search:
    """Chooses a value of `space` on validation data; see the module docstring for how.

    `epochs`: the length of every run; `selection`: how candidates are stopped and chosen
    (the race, the stopping rule); `peek`: where in the first epoch a candidate is first
    compared.
    """

    def __init__(self, space: SearchSpace, epochs: int, *, peek: float = PEEK,
                 selection: Selection | None = None) -> None:
        if epochs < 1 or not 0 < peek < 1:
            raise ValueError("epochs must be >= 1 and 0 < peek < 1")
        self.space, self.epochs, self.peek = space, epochs, peek
        self.selection = selection or Selection()

    @property
    def grid(self) -> list[float]:
        return list(self.space.values)

    def run(self, make_trainer: MakeTrainer, train_loader: Iterable[Any],
            val_loader: Iterable[Any], activations: ActivationCaches | None = None
            ) -> tuple[Tuning, Trainer]:
        """(what was tried and chosen, the chosen value's trainer after all `epochs`).
        `make_trainer(change, activations)` builds a candidate's trainer, its config passed
        through `change`. `activations`: a cache the caller holds (and releases) — the
        advisor's, filled at several depths — instead of one of the search's own."""
        name = self.space.name
        if val_loader is None:
            raise ValueError(f"choosing {name} needs validation data: give a val loader "
                             "(e.g. --val-split 0.2)")
        started = time.perf_counter()
        shared = activations if activations is not None else ActivationCaches()
        filled = shared.fill_seconds

        def race(value: float, rival: _Run | None) -> _Run:
            run = _Run(value)
            trainer = make_trainer(self.space.apply(value), shared)
            if trainer.config.epochs != self.epochs:
                raise ValueError(f"make_trainer built a trainer for {trainer.config.epochs} "
                                 f"epochs; the search runs {self.epochs}")
            if getattr(trainer.config, name, None) != value:
                raise ValueError(f"make_trainer built a trainer with {name}="
                                 f"{getattr(trainer.config, name, None)!r} for the candidate "
                                 f"{value:g}: build its config with the change it is given")
            racing = Race(run, val_loader, rival, self.peek, self.selection)
            trainer.callbacks.append(racing)
            try:
                trainer.fit(train_loader, val_loader)
            except Behind:
                return run
            except NonFiniteLossError:  # diverged (on every rank at once): out of the race
                run.diverged = True
                return run
            finally:  # the trainer goes back as it was built, and no cycle keeps it alive
                trainer.callbacks.remove(racing)
            if run.reached >= self.epochs:
                run.trainer = trainer
            return run

        try:
            best, tried = self.search(race)
        finally:
            if activations is None:
                shared.release()
        if best.trainer is None:
            raise RuntimeError("the search chose a run that did not finish")
        tuning = Tuning(name, best.value, tuple(r.record() for r in tried),
                        time.perf_counter() - started, self.describe(),
                        shared.fill_seconds - filled, self.selection.criterion)
        return tuning, best.trainer

    def search(self, race: Callable[[float, _Run | None], _Run]) -> tuple[_Run, list[_Run]]:
        """The order of the search, given `race(value, rival)` that trains (or replays) one
        candidate against the best run so far: (the best run, every run tried)."""
        name, values = self.space.name, self.space.values
        best = race(values[0], None)
        if best.diverged:
            raise ValueError(f"the search's first {name}, {best.value:g}, diverged (the loss "
                             "became NaN or infinite): start the grid lower (--lr / --lr-grid)")
        if best.reached < self.epochs:
            raise ValueError(f"the search's first {name}, {best.value:g}, stopped before its "
                             f"{self.epochs} epochs: a search compares full runs, so leave out "
                             "callbacks that end a fit early")
        tried = [best]

        def contest(value: float, best: _Run) -> _Run:
            run = race(value, best)
            tried.append(run)
            finished = run.reached >= self.epochs and not run.diverged
            # rank 0's choice on every rank: the next candidate depends on it
            taken = distributed.same_as_main(
                finished and self.selection.better(run.last[1], best.last[1]))
            return run if taken else best

        for value in values[1:]:
            best = contest(value, best)
        for direction in (-1, 1):  # past the edge the best run holds, while it holds it
            for _ in range(self.space.max_extensions):
                edge = (min if direction < 0 else max)(r.value for r in tried)
                value = self.space.beyond(edge, direction)
                if best.value != edge or value is None:
                    break
                best = contest(value, best)
        return best, tried

    def describe(self) -> str:
        switch = self.selection.switch_z
        return (f"each {self.space.name} raced the best run so far on the same validation "
                f"images and stopped once behind beyond noise ({self.selection.stop_z:g} "
                f"standard errors of the paired differences, at {self.peek:.2g} of the first "
                f"epoch or an epoch's end); chosen by validation {self.selection.criterion}"
                + (f", a finisher taken when ahead by {switch:g} standard errors"
                   if switch is not None else ""))


class LrSearch(Search):
    """The search over the learning rate (`lr_space`): `grid`, the lrs to try, the first
    trained in full first; `step`: the ratio of one grid extension."""

    def __init__(self, grid: Sequence[float], epochs: int, *, peek: float = PEEK,
                 max_extensions: int = 2, bounds: tuple[float, float] = (1e-6, 1.0),
                 step: float | None = None, selection: Selection | None = None) -> None:
        super().__init__(lr_space(grid, bounds=bounds, step=step,
                                  max_extensions=max_extensions),
                         epochs, peek=peek, selection=selection)
