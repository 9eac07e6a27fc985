"""`--hindsight`: what tuning leaves on the table. Every lr a tuned row could choose trains to the
end at that fixed lr and is evaluated on test; per strategy, the best of them in hindsight
stands beside the tuned row. A measurement, never a way to choose: these rows read the test
set once per lr, so they are kept apart from the rows, the table and the verdict
(results.json's `hindsight`, `hindsight.csv`, a section of results.md), each labelled so."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from finetune.compare.settings import ADVISED, Settings


def hindsight_lrs(settings: Settings, rows: Sequence[dict[str, Any]], spec: str
                  ) -> list[float]:
    """The grid and every lr the tuned rows of `spec` tried (a grid grown past its edge)."""
    tried = {c["lr"] for r in rows if r["strategy"] == spec and r.get("tuning")
             for c in r["tuning"]["candidates"]}
    return sorted(set(settings.lr_grid) | tried)


def run_hindsight(settings: Settings, rows: Sequence[dict[str, Any]],
                  run: Callable[[str, int, Settings], dict[str, Any]]) -> list[dict[str, Any]]:
    """`run(spec, seed, settings)` at each fixed lr of `hindsight_lrs`, for every strategy
    (the advised row aside: its strategy differs by seed) and seed; rows marked `hindsight`."""
    out = []
    for spec in settings.strategies:
        if spec == ADVISED:
            continue
        for lr in hindsight_lrs(settings, rows, spec):
            fixed = settings.evolve(tune="none", lr=lr, lr_grid=())
            for seed in settings.seeds:
                row = run(spec, seed, fixed)
                print(f"hindsight {spec} seed {seed} lr {lr:g}: test "
                      f"{100 * row['test_accuracy']:.1f}% (a measurement: not a row)",
                      flush=True)
                out.append({"hindsight": True, "strategy": spec, "seed": seed, "lr": lr,
                            "test_accuracy": row["test_accuracy"],
                            "val_accuracy": row["val_accuracy"],
                            "test_predictions": row["test_predictions"]})
    return out


def summarize_hindsight(rows: Sequence[dict[str, Any]], hindsight: Sequence[dict[str, Any]],
                        targets: Sequence[int]) -> list[dict[str, Any]]:
    """Per strategy: each fixed lr's mean test accuracy, the best in hindsight, and the tuned
    row's difference from it (paired over the same seeds' test images, 95% half-width)."""
    truth = np.asarray(targets)
    summary = []
    for spec in dict.fromkeys(h["strategy"] for h in hindsight):
        fixed = [h for h in hindsight if h["strategy"] == spec]
        by_lr = {lr: [h for h in fixed if h["lr"] == lr] for lr in sorted({h["lr"] for h in fixed})}
        means = {lr: statistics.fmean(h["test_accuracy"] for h in runs)
                 for lr, runs in by_lr.items()}
        best = max(means, key=means.__getitem__)
        entry: dict[str, Any] = {"strategy": spec, "label": "hindsight (reads test per lr)",
                                 "fixed": {f"{lr:g}": m for lr, m in means.items()},
                                 "best_lr": best, "best_test_accuracy": means[best]}
        tuned = {r["seed"]: r for r in rows if r["strategy"] == spec}
        seeds = [h["seed"] for h in by_lr[best] if h["seed"] in tuned]
        if seeds:
            ours = np.concatenate([np.asarray(tuned[s]["test_predictions"]) == truth
                                   for s in seeds])
            theirs = np.concatenate([np.asarray(h["test_predictions"]) == truth
                                     for h in by_lr[best] if h["seed"] in tuned])
            entry["tuned_test_accuracy"] = float(ours.mean())
            entry["tuned_minus_best"], entry["tuned_minus_best_ci95"] = paired_points(ours,
                                                                                   theirs)
        summary.append(entry)
    return summary


def paired_points(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """The mean difference of two runs' correctness on the same test images, in points, and
    its 95% half-width (normal approximation of the paired differences)."""
    difference = ours.astype(float) - theirs.astype(float)
    half = (1.96 * float(difference.std(ddof=1)) / math.sqrt(len(difference))
            if len(difference) > 1 else 0.0)
    return 100 * float(difference.mean()), 100 * half


def hindsight_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The section of results.md: never part of the table or the verdict above it."""
    if not summary:
        return ""
    lrs = sorted({float(lr) for s in summary for lr in s["fixed"]})
    lines = ["## Hindsight (a measurement: each fixed lr read the test set)", "",
             "| strategy | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | best in hindsight | tuned row | tuned − best (points) |",
             "|---" + "|---:" * (len(lrs) + 3) + "|"]
    for s in summary:
        cells = [f"{100 * s['fixed'][f'{lr:g}']:.1f}" if f"{lr:g}" in s["fixed"] else "–"
                 for lr in lrs]
        tuned = (f"{100 * s['tuned_test_accuracy']:.1f}" if "tuned_test_accuracy" in s
                 else "–")
        gap = (f"{s['tuned_minus_best']:+.1f} ± {s['tuned_minus_best_ci95']:.1f}"
               if "tuned_minus_best" in s else "–")
        lines.append(f"| {s['strategy']} | " + " | ".join(cells)
                     + f" | {100 * s['best_test_accuracy']:.1f} ({s['best_lr']:g}) | {tuned} | "
                     f"{gap} |")
    return "\n".join(lines) + "\n"
