"""How sure a test accuracy is, and whether two models really differ on the same test images.

A test accuracy moves for two reasons: the test set is one sample of images (another sample of
the same classes would score differently), and training is random (another seed gives other
weights). Everything here is computed from stored predictions, so no model is needed:

- `Bootstrap.accuracy` / `.macro_f1`: a percentile-bootstrap interval. One run: test images are
  drawn with replacement. Several runs of the same model (seeds, rows of a runs × images
  array): a two-stage bootstrap — runs are drawn with replacement, then images, the same images
  for every run — so the interval holds training noise as well as test-set noise.
- `Bootstrap.difference`: the paired version for two models evaluated on the same images:
  every draw scores both on the same resampled images (the pairing removes the images both get
  right or both get wrong from the noise), their runs drawn independently. The p-value is the
  smallest level at which the equal-tailed percentile interval of the difference excludes 0.
- `pairwise`: every pair, with Holm–Bonferroni adjusted p-values (`holm`).
- `mcnemar_exact`: the textbook exact test for two single models on one test set.

Numpy only. The percentile method (not BCa) because BCa's acceleration needs a jackknife with
no standard form for the two-stage draw; its known weakness — intervals a little too narrow for
accuracies near 0 or 1 on small test sets — is stated in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations
from typing import Any

import attrs
import numpy as np

DEFAULT_RESAMPLES = 2000
_CHUNK_VALUES = 4_000_000  # weights per chunk: bounds memory whatever the test-set size


def _as_targets(values: Any) -> np.ndarray:
    targets = np.asarray(values)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError(f"targets must be a non-empty 1-D sequence of class indices; got shape "
                         f"{targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0:
        raise ValueError("targets must be class indices (integers ≥ 0); map names to indices "
                         "first, e.g. with the dataset's classes list")
    return targets.astype(np.int64)


def _positive(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: int) -> None:
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer ≥ {minimum}; got {value!r}")
    return check


def _open_unit(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{attribute.name} must lie strictly between 0 and 1 (e.g. 0.95); "
                         f"got {value!r}")


@attrs.frozen
class Estimate:
    """A statistic (mean over runs) and its bootstrap interval at `level`."""

    value: float
    low: float
    high: float
    level: float
    runs: int

    @property
    def interval(self) -> list[float]:
        return [self.low, self.high]


@attrs.frozen
class Difference:
    """Accuracy of `a` minus accuracy of `b` (means over runs) on the same images, its
    bootstrap interval and two-sided p-value (unadjusted)."""

    value: float
    low: float
    high: float
    level: float
    p_value: float


@attrs.frozen(kw_only=True)
class Bootstrap:
    """Bootstrap draws over one test set's images, reproducible from `seed`.

    Predictions are one run (a sequence of class indices, one per image in `targets`' order) or
    several runs of the same model (a runs × images array). Every method replays the same image
    draws, so an interval and a difference computed from one `Bootstrap` agree.
    """

    targets: np.ndarray = attrs.field(converter=_as_targets, eq=False)
    num_classes: int = attrs.field(default=0, validator=_positive(0))
    resamples: int = attrs.field(default=DEFAULT_RESAMPLES, validator=_positive(100))
    level: float = attrs.field(default=0.95, validator=_open_unit)
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        needed = int(self.targets.max()) + 1
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", needed)
        elif self.num_classes < needed:
            raise ValueError(f"num_classes={self.num_classes} but a target is {needed - 1}; "
                             "pass the number of classes of the dataset")

    @property
    def images(self) -> int:
        return int(self.targets.size)

    def subset(self, mask: np.ndarray) -> Bootstrap:
        """The same settings on the images where `mask` is true (e.g. one class)."""
        return attrs.evolve(self, targets=self.targets[np.asarray(mask, dtype=bool)])

    # -- statistics ---------------------------------------------------------------------------
    def accuracy(self, predictions: Any) -> Estimate:
        """Accuracy (mean over runs) and its interval."""
        correct = self._runs(predictions) == self.targets
        draws = self._run_draws(len(correct), stream=1)
        boot = self._resample(lambda w: w @ correct.T.astype(np.float64) / self.images, draws)
        return self._estimate(float(correct.mean()), boot, len(correct))

    def macro_f1(self, predictions: Any) -> Estimate:
        """Macro F1 (mean over runs, each the unweighted mean of per-class F1) and its
        interval; 0/0 counts as 0, as in `finetune.core.metrics`."""
        runs = self._runs(predictions)
        k = self.num_classes
        truth = np.eye(k)[self.targets]                              # n × K
        predicted = np.eye(k)[runs].transpose(1, 0, 2).reshape(self.images, -1)  # n × RK
        hits = predicted * np.tile(truth, len(runs))                 # n × RK

        def f1(weights: np.ndarray) -> np.ndarray:
            support = np.tile(weights @ truth, len(runs))
            per_class = _divide(2 * (weights @ hits), support + weights @ predicted)
            return per_class.reshape(len(weights), len(runs), k).mean(axis=2)

        value = float(f1(np.ones((1, self.images)))[0].mean())
        boot = self._resample(f1, self._run_draws(len(runs), stream=1))
        return self._estimate(value, boot, len(runs))

    def difference(self, predictions_a: Any, predictions_b: Any) -> Difference:
        """Accuracy of a minus b, paired on the same resampled images; runs of each model are
        drawn independently (a and b may have different numbers of runs)."""
        correct_a = self._runs(predictions_a) == self.targets
        correct_b = self._runs(predictions_b) == self.targets
        both = np.concatenate([correct_a, correct_b]).T.astype(np.float64)  # n × (Ra + Rb)
        boot = self._resample(lambda w: w @ both / self.images,
                              self._run_draws(len(correct_a), stream=1),
                              self._run_draws(len(correct_b), stream=2) + len(correct_a))
        value = float(correct_a.mean() - correct_b.mean())
        below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
        p_value = min(1.0, 2 * (min(below, above) + 1) / (self.resamples + 1))
        low, high = self._percentiles(boot)
        return Difference(value, low, high, self.level, p_value)

    # -- machinery ----------------------------------------------------------------------------
    def _runs(self, predictions: Any) -> np.ndarray:
        runs = np.asarray(predictions)
        if runs.ndim == 1:
            runs = runs[None, :]
        if runs.ndim != 2 or runs.shape[1] != self.images or runs.shape[0] == 0:
            raise ValueError(f"predictions must be one run of {self.images} class indices (as "
                             f"many as targets) or a runs × {self.images} array; got shape "
                             f"{np.shape(predictions)}")
        if runs.min() < 0 or runs.max() >= self.num_classes:
            raise ValueError(f"a prediction lies outside 0..{self.num_classes - 1}; pass "
                             "num_classes (the dataset's class count)")
        return runs.astype(np.int64)

    def _run_draws(self, runs: int, stream: int) -> np.ndarray:
        """resamples × runs indices of runs drawn with replacement (all zeros for one run)."""
        if runs == 1:
            return np.zeros((self.resamples, 1), dtype=np.int64)
        rng = np.random.default_rng([self.seed, stream])
        return rng.integers(0, runs, size=(self.resamples, runs))

    def _image_weights(self) -> Iterator[np.ndarray]:
        """How often each image is drawn, chunk × images, `resamples` rows in all."""
        rng = np.random.default_rng([self.seed, 0])
        n = self.images
        chunk = max(1, _CHUNK_VALUES // n)
        for start in range(0, self.resamples, chunk):
            rows = min(chunk, self.resamples - start)
            drawn = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
            yield np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(
                np.float64)

    def _resample(self, statistic: Any, plus: np.ndarray,
                  minus: np.ndarray | None = None) -> np.ndarray:
        """Per draw: the mean of `statistic(weights)` (draws × runs) over the runs in that row
        of `plus`, minus the mean over the runs in `minus` (the difference of two models)."""
        out, start = np.empty(self.resamples), 0
        for weights in self._image_weights():
            values = statistic(weights)
            rows = slice(start, start + len(weights))
            out[rows] = np.take_along_axis(values, plus[rows], axis=1).mean(axis=1)
            if minus is not None:
                out[rows] -= np.take_along_axis(values, minus[rows], axis=1).mean(axis=1)
            start += len(weights)
        return out

    def _percentiles(self, boot: np.ndarray) -> tuple[float, float]:
        tail = (1 - self.level) / 2
        low, high = np.quantile(boot, [tail, 1 - tail])
        return float(low), float(high)

    def _estimate(self, value: float, boot: np.ndarray, runs: int) -> Estimate:
        low, high = self._percentiles(boot)
        return Estimate(value, low, high, self.level, runs)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


# -- tests on p-values --------------------------------------------------------------------------
def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray,
                  correct_b: Sequence[bool] | np.ndarray) -> float:
    """Two-sided exact McNemar p-value for two models scored on the same images: of the images
    exactly one model gets right, is the split between them further from 50:50 than chance?"""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D and pair up image by image; got "
                         f"shapes {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given): compare each with the level to
    control the chance of any false 'significant' among all the tests at that level."""
    values = [float(p) for p in p_values]
    if any(not 0.0 <= p <= 1.0 for p in values):
        raise ValueError(f"p-values must lie in [0, 1]; got {values}")
    adjusted, running = [0.0] * len(values), 0.0
    for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__)):
        running = max(running, min(1.0, (len(values) - rank) * values[index]))
        adjusted[index] = running
    return adjusted


@attrs.frozen
class Pairwise:
    """One pair's paired difference, with its Holm-adjusted p-value among all pairs."""

    a: str
    b: str
    difference: Difference
    p_adjusted: float
    significant: bool

    def to_dict(self) -> dict[str, Any]:
        interval = f"ci{round(100 * self.difference.level)}"  # ci95 at the default level
        return {"a": self.a, "b": self.b, "difference": self.difference.value,
                interval: [self.difference.low, self.difference.high],
                "p_value": self.p_adjusted, "p_unadjusted": self.difference.p_value,
                "significant": self.significant}


def pairwise(bootstrap: Bootstrap, predictions: Mapping[str, Any],
             alpha: float | None = None) -> list[Pairwise]:
    """Every pair of models (in the mapping's order, a before b), significant where the
    Holm-adjusted p-value is below `alpha` (default: 1 − the bootstrap's level)."""
    alpha = 1 - bootstrap.level if alpha is None else alpha
    pairs = list(combinations(predictions, 2))
    found = [bootstrap.difference(predictions[a], predictions[b]) for a, b in pairs]
    adjusted = holm([d.p_value for d in found])
    return [Pairwise(a, b, d, p, p < alpha)
            for (a, b), d, p in zip(pairs, found, adjusted, strict=True)]
