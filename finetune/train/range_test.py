"""The learning-rate range test (Smith, 2015; fastai's `lr_find`): train with an lr growing
exponentially from `start` to `end`, one value per optimizer step, and read the smoothed loss
against it. `Trainer.lr_find` runs it on a copy of the run's state and puts the weights back.

The suggestion's rule, stated once: **fastai's "valley"** — the longest run over which the
smoothed loss keeps falling (its longest decreasing subsequence), and the lr halfway along it:
past the flat start, well before the minimum, where the lr is already unstable. Two older rules
are reported beside it: the minimum's lr divided by 10 (fastai's `lr_min`) and the steepest
descent of the smoothed loss against log lr.
Under the activation cache a frozen prefix runs once, so a test of a head costs almost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from finetune.atomic import atomic_write, atomic_write_json
from finetune.train.events import Callback, StopFit

DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
RULE = "fastai's valley: halfway along the longest stretch of falling smoothed loss"


MIN_STEPS = 3  # what a suggestion needs: a slope on each side of a point


def ramp(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates from `start` to `end`, evenly spaced in log scale."""
    if not (0 < start < end) or steps < MIN_STEPS:
        raise ValueError(f"the range test needs 0 < start < end and at least {MIN_STEPS} steps "
                         f"(got start={start}, end={end}, steps={steps})")
    ratio = (end / start) ** (1 / (steps - 1))
    return [start * ratio**i for i in range(steps)]


def smoothing(steps: int) -> float:
    """The moving average's beta: a window of about a tenth of the ramp (fastai's 0.98 is
    for its 100 steps on large data; on a small set the loss falls within a few steps and a
    50-step window lags the curve by most of a decade)."""
    return min(0.98, max(0.5, 1 - 10 / steps))


def smooth(losses: Sequence[float], beta: float | None = None) -> list[float]:
    """Exponential moving average of `losses`, bias-corrected so early values are not low."""
    beta = smoothing(len(losses)) if beta is None else beta
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def valley(lrs: Sequence[float], smoothed: Sequence[float]) -> float:
    """fastai's "valley": the longest decreasing subsequence of the smoothed loss, and the lr
    halfway along it (its start plus a third plus a sixth of its length, as fastai counts)."""
    n = len(smoothed)
    length = [1] * n  # longest decreasing subsequence ending at i
    start, end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[i] > length[end]:
            end = i
            start = end - length[end]
    sections = (end - start) / 3
    return lrs[max(0, start + int(sections) + int(sections / 2))]


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float, float]:
    """(valley, minimum / 10, steepest): `RULE`; the lr at the smoothed minimum over 10; and
    the lr of the most negative slope of the smoothed loss against log lr (the first and last
    tenth left out: the average is settling there and the loss is blowing up)."""
    if len(lrs) != len(smoothed) or len(lrs) < 3:
        raise ValueError(f"the range test recorded {len(smoothed)} step(s), too few for a "
                         f"suggestion (it needs {MIN_STEPS}); start the ramp lower (--start)")
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    margin = max(1, len(lrs) // 10)
    inner = range(margin, max(margin + 1, len(lrs) - margin))
    last = len(lrs) - 1
    slopes = {i: (smoothed[min(i + 1, last)] - smoothed[i - 1])
              / (math.log(lrs[min(i + 1, last)]) - math.log(lrs[i - 1])) for i in inner}
    steepest = min(slopes, key=slopes.__getitem__)
    return valley(lrs, smoothed), lrs[best] / 10, lrs[steepest]


@attrs.frozen
class LrFinding:
    """What a range test saw: each step's lr and loss, the smoothed loss, the suggestion
    (`RULE`), the other rules' lrs, and why it ended ("end" of the ramp or "diverged")."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    suggestion: float
    minimum_tenth: float
    steepest: float
    ended: str
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in attrs.asdict(self).items()}

    def summary(self) -> str:
        return (f"suggested lr {self.suggestion:.3g} ({self.rule}); minimum/10: "
                f"{self.minimum_tenth:.3g}; steepest descent: {self.steepest:.3g}; "
                f"{len(self.lrs)} steps, {self.lrs[0]:.3g} to {self.lrs[-1]:.3g}, ended: "
                f"{self.ended}")

    def write(self, folder: str | Path) -> list[Path]:
        """lr_find.json and (with matplotlib) lr_find.png in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [atomic_write_json(folder / "lr_find.json", self.to_dict(), indent=2)]
        plot = self.plot(folder / "lr_find.png")
        return written + ([plot] if plot else [])

    def plot(self, path: str | Path) -> Path | None:
        try:
            from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
        except ImportError:
            return None
        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.add_subplot()
        axes.plot(self.lrs, self.losses, color="0.75", label="loss per step")
        axes.plot(self.lrs, self.smoothed, color="C0", label="smoothed")
        axes.axvline(self.suggestion, color="C2", linestyle="--",
                     label=f"suggested {self.suggestion:.2g}")
        axes.axvline(self.minimum_tenth, color="C3", linestyle="-.",
                     label=f"minimum/10 {self.minimum_tenth:.2g}")
        axes.axvline(self.steepest, color="C1", linestyle=":",
                     label=f"steepest {self.steepest:.2g}")
        axes.set(xscale="log", xlabel="learning rate", ylabel="training loss",
                 title="learning-rate range test")
        spread = max(self.smoothed) - min(self.losses)  # a diverging step's spike is cut
        axes.set_ylim(min(self.losses) - 0.05 * spread, max(self.smoothed) + 0.1 * spread)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = Path(path)
        atomic_write(path, lambda file: figure.savefig(file, format="png"))
        return path


class RangeTest(Callback):
    """Sets each optimizer step's lr from `ramp` (times each group's `lr_multiplier`, so a
    strategy's per-group lrs keep their ratios), records the loss, and ends the fit
    (`StopFit`) at the ramp's end or when the smoothed loss diverges."""

    def __init__(self, start: float = 1e-7, end: float = 1.0, steps: int = 100) -> None:
        self.lrs = ramp(start, end, steps)
        self.losses: list[float] = []  # step i trained at self.lrs[i]
        self.ended = "end"

    def on_fit_start(self, trainer: Any) -> None:
        self._set(trainer, 0)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._set(trainer, len(self.losses))  # the optimizer is rebuilt when what trains changes

    def on_train_batch_end(self, trainer: Any, batch: Any, outputs: Any) -> None:
        if not outputs.stepped:
            return
        self.losses.append(outputs.loss)
        if not math.isfinite(outputs.loss) or self.diverged():
            self.ended = "diverged"
            raise StopFit("the loss diverged")
        if len(self.losses) == len(self.lrs):
            raise StopFit("the lr ramp is done")
        self._set(trainer, len(self.losses))

    def diverged(self) -> bool:
        smoothed = smooth(self.losses)
        return len(smoothed) > 1 and smoothed[-1] > DIVERGED * min(smoothed)

    def _set(self, trainer: Any, index: int) -> None:
        for group in trainer.optimizer.param_groups:
            group["lr"] = self.lrs[min(index, len(self.lrs) - 1)] * group.get("lr_multiplier",
                                                                              1.0)

    def finding(self) -> LrFinding:
        smoothed, seen = smooth(self.losses), self.lrs[:len(self.losses)]
        return LrFinding(tuple(seen), tuple(self.losses), tuple(smoothed),
                         *suggest(seen, smoothed), self.ended)
