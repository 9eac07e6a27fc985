"""PNG plots for `benchmarks.compare`: accuracy per strategy, accuracy against training time,
and a per-class heatmap.

Each takes the per-strategy summary rows that `compare.summarize` builds (plain dicts), so
plots can be redrawn from a results.json without training again. `matplotlib.figure.Figure`
is used instead of pyplot so the caller's backend and open figures are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from finetune.atomic import atomic_write

Summary = Sequence[dict[str, Any]]


def plot_accuracy(summary: Summary, path: Path) -> Path:
    """Grouped bars of val and test accuracy per strategy, error bars = std over seeds."""
    names = [s["strategy"] for s in summary]
    x = np.arange(len(names))
    figure = Figure(figsize=(max(6.0, 1.3 * len(names) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    for offset, split, colour in ((-0.2, "val", "tab:blue"), (0.2, "test", "tab:orange")):
        means = [100 * s[f"{split}_accuracy"] for s in summary]
        stds = [100 * s[f"{split}_accuracy_std"] for s in summary]
        axes.bar(x + offset, means, width=0.4, yerr=stds, capsize=4, label=split, color=colour)
    axes.set_xticks(x)
    axes.set_xticklabels(names, rotation=30, ha="right")
    axes.set(ylabel="accuracy (%)", ylim=(0, 100), title="accuracy per strategy (mean ± std)")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path


def plot_accuracy_vs_time(summary: Summary, path: Path) -> Path:
    """Test accuracy against total training time (seconds per epoch × epochs): the cost of
    each point of accuracy at a glance."""
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    for s in summary:
        seconds = s["seconds_per_epoch"] * s["epochs"]
        accuracy, std = 100 * s["test_accuracy"], 100 * s["test_accuracy_std"]
        axes.errorbar(seconds, accuracy, yerr=std, fmt="o", capsize=4)
        axes.annotate(s["strategy"], (seconds, accuracy), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    axes.set(xlabel="training time (s, all epochs incl. validation)", ylabel="test accuracy (%)",
             title="accuracy against training time")
    axes.grid(alpha=0.3)
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path


def plot_per_class_heatmap(
    strategies: Sequence[str], classes: Sequence[str], matrix: np.ndarray, path: Path
) -> Path:
    """Strategies × classes test accuracy (mean over seeds), values printed in each cell."""
    rows, cols = matrix.shape
    figure = Figure(figsize=(max(6.0, 0.55 * cols + 3), max(3.0, 0.5 * rows + 2)),
                    layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(100 * matrix, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    axes.set_xticks(range(cols))
    axes.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(rows))
    axes.set_yticklabels(strategies, fontsize=9)
    for i in range(rows):
        for j in range(cols):
            value = 100 * matrix[i, j]
            axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                      color="black" if value > 60 else "white")
    axes.set_title("per-class test accuracy")
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path
