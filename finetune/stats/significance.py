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
- `Bootstrap.pairwise`: every pair, with Holm–Bonferroni adjusted p-values (`holm`).
- `mcnemar_exact`: the textbook exact test for two single models on one test set.

Numpy only. The percentile method (not BCa) because BCa's acceleration needs a jackknife with
no standard form for the two-stage draw; its known weakness — intervals a little too narrow for
accuracies near 0 or 1 on small test sets — is stated in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations
from typing import Any

import attrs
import numpy as np

from finetune.stats.metrics import safe_divide

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
        """[low, high], rounded to 1e-6 (a percentage's fourth decimal): what reports and
        results.json hold, the same on every machine."""
        return [round(self.low, 6), round(self.high, 6)]


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
        return self._estimate(float(correct.mean()), self.accuracy_draws(predictions)[0],
                              len(correct))

    def macro_f1(self, predictions: Any) -> Estimate:
        """Macro F1 (mean over runs, each the unweighted mean of per-class F1) and its
        interval; 0/0 counts as 0, as in `finetune.stats.metrics`."""
        runs = self._runs(predictions)
        k = self.num_classes
        truth = np.eye(k)[self.targets]                              # n × K
        predicted = np.eye(k)[runs].transpose(1, 0, 2).reshape(self.images, -1)  # n × RK
        hits = predicted * np.tile(truth, len(runs))                 # n × RK

        def f1(weights: np.ndarray) -> np.ndarray:
            support = np.tile(weights @ truth, len(runs))
            per_class = safe_divide(2 * (weights @ hits), support + weights @ predicted)
            return per_class.reshape(len(weights), len(runs), k).mean(axis=2)

        value = float(f1(np.ones((1, self.images)))[0].mean())
        boot = self._resample(f1, [self._run_draws(len(runs), stream=1)])[0]
        return self._estimate(value, boot, len(runs))

    def difference(self, predictions_a: Any, predictions_b: Any) -> Difference:
        """Accuracy of a minus b, paired on the same resampled images; runs of each model are
        drawn independently (a and b may have different numbers of runs)."""
        draws_a, draws_b = self.accuracy_draws(predictions_a, predictions_b)
        value = float((self._runs(predictions_a) == self.targets).mean()
                      - (self._runs(predictions_b) == self.targets).mean())
        return self._difference(value, draws_a - draws_b)

    def accuracy_draws(self, *models: Any) -> list[np.ndarray]:
        """Each model's accuracy in every draw (`resamples` values each): the same resampled
        images for all models — the pairing — and each model's runs drawn independently."""
        correct = [self._runs(m) == self.targets for m in models]
        columns = np.concatenate(correct).T.astype(np.float64)  # images × all runs
        offsets = np.cumsum([0, *(len(c) for c in correct)])
        draws = [self._run_draws(len(c), stream=i + 1) + offsets[i]
                 for i, c in enumerate(correct)]
        return self._resample(lambda w: w @ columns / self.images, draws)

    def _difference(self, value: float, boot: np.ndarray) -> Difference:
        below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
        p_value = min(1.0, 2 * (min(below, above) + 1) / (self.resamples + 1))
        low, high = self._percentiles(boot)
        return Difference(value, low, high, self.level, p_value)

    def differences(self, predictions: Mapping[str, Any],
                    pairs: Sequence[tuple[str, str]]) -> list[Difference]:
        """`difference(predictions[a], predictions[b])` for each pair, from one pass over the
        images for all models (unadjusted p-values)."""
        names = list(predictions)
        draws = dict(zip(names, self.accuracy_draws(*predictions.values()), strict=True))
        means = {name: float((self._runs(m) == self.targets).mean())
                 for name, m in predictions.items()}
        return [self._difference(means[a] - means[b], draws[a] - draws[b]) for a, b in pairs]

    def pairwise(self, predictions: Mapping[str, Any],
                 alpha: float | None = None) -> list[Pairwise]:
        """Every pair of models (in the mapping's order, a before b), significant where the
        Holm-adjusted p-value is below `alpha` (default: 1 − the level).

        The draws are raised to at least `draws_for(pairs, alpha)`, so that the smallest
        p-value a bootstrap can give survives Holm's correction.
        """
        alpha = 1 - self.level if alpha is None else alpha
        pairs = list(combinations(predictions, 2))
        if draws_for(len(pairs), alpha) > self.resamples:
            bootstrap = attrs.evolve(self, resamples=draws_for(len(pairs), alpha))
            return bootstrap.pairwise(predictions, alpha)
        found = self.differences(predictions, pairs)
        adjusted = holm([d.p_value for d in found])
        return [Pairwise(a, b, d, p, p < alpha)
                for (a, b), d, p in zip(pairs, found, adjusted, strict=True)]

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
        if self.images * self.resamples <= _CHUNK_VALUES:  # the common case: one chunk, reused
            yield _one_chunk(self.images, self.resamples, self.seed)
            return
        rng = np.random.default_rng([self.seed, 0])
        chunk = max(1, _CHUNK_VALUES // self.images)
        for start in range(0, self.resamples, chunk):
            yield _draw_counts(rng, min(chunk, self.resamples - start), self.images)

    def _resample(self, statistic: Any, draws: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per draw of images: `statistic(weights)` (draws × runs), averaged over the runs
        that each array in `draws` (resamples × its runs, column indices) picks."""
        out = [np.empty(self.resamples) for _ in draws]
        start = 0
        for weights in self._image_weights():
            values = statistic(weights)
            rows = slice(start, start + len(weights))
            for result, picks in zip(out, draws, strict=True):
                result[rows] = np.take_along_axis(values, picks[rows], axis=1).mean(axis=1)
            start += len(weights)
        return out

    def _percentiles(self, boot: np.ndarray) -> tuple[float, float]:
        tail = (1 - self.level) / 2
        low, high = np.quantile(boot, [tail, 1 - tail])
        return float(low), float(high)

    def _estimate(self, value: float, boot: np.ndarray, runs: int) -> Estimate:
        low, high = self._percentiles(boot)
        return Estimate(value, low, high, self.level, runs)


def draws_for(tests: int, alpha: float) -> int:
    """Draws enough for `tests` Holm-corrected bootstrap tests at `alpha`: the smallest p-value
    a bootstrap gives, 2 / (draws + 1), times `tests` stays below alpha / 10."""
    return math.ceil(20 * tests / alpha)


def _draw_counts(rng: np.random.Generator, rows: int, images: int) -> np.ndarray:
    drawn = rng.integers(0, images, size=(rows, images)) + images * np.arange(rows)[:, None]
    counts = np.bincount(drawn.ravel(), minlength=rows * images)
    return counts.reshape(rows, images).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _one_chunk(images: int, resamples: int, seed: int) -> np.ndarray:
    """The draws of one chunk, kept: intervals and tests on one test set reuse them."""
    counts = _draw_counts(np.random.default_rng([seed, 0]), resamples, images)
    counts.flags.writeable = False
    return counts


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
