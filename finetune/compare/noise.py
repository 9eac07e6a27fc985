"""How sure a comparison is, from the test predictions stored in its rows (no retraining):
intervals per run and per strategy, every pair of strategies tested, the verdict, and which
per-class accuracies differ from the best strategy's beyond noise.

Methods and their limits: `finetune.stats.significance` and docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from finetune.compare.verdict import Candidate, Verdict, judge
from finetune.stats.significance import Bootstrap, Pairwise, draws_for, holm

RESAMPLES = 2000
SEED = 0  # the bootstrap's own seed: the same rows always give the same intervals
ALPHA = 0.05


def run_intervals(targets: Sequence[int], predictions: Sequence[int],
                  num_classes: int) -> dict[str, list[float]]:
    """A run's 95% intervals of test accuracy and macro F1 (test images resampled)."""
    bootstrap = Bootstrap(targets=np.asarray(targets), num_classes=num_classes,
                          resamples=RESAMPLES, seed=SEED)
    return {"test_accuracy_ci95": bootstrap.accuracy(predictions).interval,
            "test_macro_f1_ci95": bootstrap.macro_f1(predictions).interval}


@attrs.frozen
class ClassMarks:
    """Per class, which strategies' accuracy differs from `reference`'s beyond noise (paired
    bootstrap on that class's test images, Holm over every class × strategy test)."""

    reference: str
    marked: np.ndarray  # strategies × classes, bool
    tests: int


@attrs.frozen
class Analysis:
    intervals: dict[str, dict[str, list[float]]]  # per strategy, over all its runs
    pairs: list[Pairwise]
    verdict: Verdict
    classes: ClassMarks | None

    def to_dict(self) -> dict[str, Any]:
        """The results.json fields (the intervals go into each summary row instead)."""
        marks = self.classes
        return {"pairwise": [p.to_dict() for p in self.pairs], "verdict": self.verdict.text,
                "best_within_noise": list(self.verdict.best),
                "per_class_differs_from": None if marks is None else {
                    "reference": marks.reference, "tests": marks.tests,
                    "marked": marks.marked.tolist()}}


def predictions_by_strategy(rows: Sequence[dict[str, Any]],
                            strategies: Sequence[str]) -> dict[str, np.ndarray]:
    """runs × images predictions per strategy that has finished runs, in `strategies` order."""
    found = {}
    for spec in strategies:
        runs = [r["test_predictions"] for r in rows if r["strategy"] == spec]
        if runs:
            found[spec] = np.asarray(runs, dtype=np.int64)
    return found


def analyze(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
            targets: Sequence[int] | None, classes: Sequence[str],
            per_class: bool = True) -> Analysis | None:
    """Everything above for the summary's strategies (the per-class tests only if
    `per_class`); None if a row has no stored predictions (results.json files written before
    they were stored)."""
    if targets is None or not rows or any(r.get("test_predictions") is None for r in rows):
        return None
    bootstrap = Bootstrap(targets=np.asarray(targets), num_classes=len(classes),
                          resamples=RESAMPLES, seed=SEED)
    predictions = predictions_by_strategy(rows, [s["strategy"] for s in summary])
    intervals = {name: {"test_accuracy_ci95": bootstrap.accuracy(runs).interval,
                        "test_macro_f1_ci95": bootstrap.macro_f1(runs).interval}
                 for name, runs in predictions.items()}
    pairs = bootstrap.pairwise(predictions, ALPHA)
    candidates = [Candidate(name=s["strategy"], accuracy=s["test_accuracy"],
                            trainable_share=s["trainable_pct"] / 100,
                            seconds_per_epoch=s["seconds_per_epoch"], runs=s["runs"])
                  for s in summary]
    verdict = judge(candidates, pairs)
    marks = (class_marks(bootstrap, predictions, verdict.best[0])
             if per_class and len(predictions) > 1 else None)
    return Analysis(intervals, pairs, verdict, marks)


def class_marks(bootstrap: Bootstrap, predictions: dict[str, np.ndarray],
                reference: str) -> ClassMarks:
    """Per class and strategy: does its accuracy on that class's images differ from the
    reference strategy's? Holm's correction runs over every class × strategy test."""
    names = list(predictions)
    present = [k for k in range(bootstrap.num_classes) if (bootstrap.targets == k).any()]
    pairs = [(name, reference) for name in names if name != reference]
    draws = max(bootstrap.resamples, draws_for(len(pairs) * len(present), ALPHA))
    p_values = []
    for k in present:
        mask = bootstrap.targets == k
        subset = attrs.evolve(bootstrap.subset(mask), resamples=draws)
        found = subset.differences({n: runs[:, mask] for n, runs in predictions.items()}, pairs)
        p_values += [d.p_value for d in found]
    marked = np.zeros((len(names), bootstrap.num_classes), dtype=bool)
    tests = [(names.index(a), k) for k in present for a, _ in pairs]
    for (i, k), p in zip(tests, holm(p_values), strict=True):
        marked[i, k] = p < ALPHA
    return ClassMarks(reference, marked, len(tests))


# -- rendering ----------------------------------------------------------------------------------
def percent_interval(bounds: Sequence[float]) -> str:
    return f"[{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def pairwise_markdown(pairs: Sequence[Pairwise]) -> str:
    lines = ["| a | b | a − b (points) | 95% CI | p (Holm) | significant |",
             "|---|---|---:|---:|---:|:---:|"]
    lines += [f"| {p.a} | {p.b} | {100 * p.difference.value:+.1f} | "
              f"{percent_interval([p.difference.low, p.difference.high])} | "
              f"{p.p_adjusted:.3g} | {'yes' if p.significant else 'no'} |" for p in pairs]
    return "\n".join(lines)


def class_marks_note(marks: ClassMarks | None) -> str:
    if marks is None:
        return ""
    count = int(marks.marked.sum())
    if count == 0:
        return (f"No per-class accuracy differs from {marks.reference}'s beyond noise "
                f"({marks.tests} class × strategy tests, paired bootstrap, Holm-corrected).")
    return (f"* differs from {marks.reference}'s accuracy on that class beyond noise "
            f"({count} of {marks.tests} class × strategy tests, paired bootstrap, "
            "Holm-corrected).")
