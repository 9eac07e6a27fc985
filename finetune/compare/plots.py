"""PNG plots for `finetune compare`: accuracy per strategy, accuracy against training time,
and a per-class heatmap.

Each takes the per-strategy summary rows that `compare.summarize` builds (plain dicts), so
plots can be redrawn from a results.json without training again. `matplotlib.figure.Figure`
is used instead of pyplot so the caller's backend and open figures are left alone, and it is
imported only when a plot is drawn: without matplotlib a comparison still writes its tables.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.atomic import atomic_write

MISSING = "plots skipped: matplotlib is not installed (pip install 'finetune[plots]')"

Summary = Sequence[dict[str, Any]]


def available() -> bool:
    """Whether matplotlib can be imported (the `[plots]` extra)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(**kwargs: Any) -> Any:
    """`matplotlib.figure.Figure(**kwargs)`, imported at the first plot drawn."""
    from matplotlib.figure import Figure as MatplotlibFigure

    return MatplotlibFigure(**kwargs)


def test_error_bars(summary: Summary) -> np.ndarray:
    """2 × strategies distances (points) from the mean test accuracy down and up to its 95%
    interval; the std over seeds where a row has no interval."""
    bars = []
    for s in summary:
        mean = 100 * s["test_accuracy"]
        low, high = (100 * v for v in s.get("test_accuracy_ci95") or (np.nan, np.nan))
        std = 100 * s["test_accuracy_std"]
        bars.append((std, std) if np.isnan(low) else (mean - low, high - mean))
    return np.array(bars, dtype=float).reshape(-1, 2).T.clip(min=0)


def plot_accuracy(summary: Summary, path: Path) -> Path:
    """Grouped bars of val and test accuracy per strategy; error bars: std over seeds (val),
    the 95% bootstrap interval (test)."""
    names = [s["strategy"] for s in summary]
    x = np.arange(len(names))
    figure = _figure(figsize=(max(6.0, 1.3 * len(names) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    val = [100 * s["val_accuracy"] for s in summary]
    axes.bar(x - 0.2, val, width=0.4, yerr=[100 * s["val_accuracy_std"] for s in summary],
             capsize=4, label="val (± std over seeds)", color="tab:blue")
    axes.bar(x + 0.2, [100 * s["test_accuracy"] for s in summary], width=0.4,
             yerr=test_error_bars(summary), capsize=4, label="test (95% interval)",
             color="tab:orange")
    axes.set_xticks(x)
    axes.set_xticklabels(names, rotation=30, ha="right")
    axes.set(ylabel="accuracy (%)", ylim=(0, 100), title="accuracy per strategy")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path


def plot_accuracy_vs_time(summary: Summary, path: Path) -> Path:
    """Test accuracy against total training time (seconds per epoch × epochs, and the
    advice's own time for the advised row): the cost of each point of accuracy at a glance."""
    figure = _figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    for s, bar in zip(summary, test_error_bars(summary).T, strict=True):
        seconds = s["seconds_per_epoch"] * s["epochs"] + s.get("advise_seconds", 0.0)
        accuracy = 100 * s["test_accuracy"]
        axes.errorbar(seconds, accuracy, yerr=bar.reshape(2, 1), fmt="o", capsize=4)
        axes.annotate(s["strategy"], (seconds, accuracy), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    axes.set(xlabel="training time (s, all epochs incl. validation)",
             ylabel="test accuracy (%), 95% interval",
             title="accuracy against training time")
    axes.grid(alpha=0.3)
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path


MAX_CLASS_ROWS = 40  # past it, the classes where the strategies differ most (all in the CSV)


def heatmap_rows(matrix: np.ndarray, limit: int = MAX_CLASS_ROWS) -> list[int]:
    """The classes (columns of `matrix`, strategies × classes) to show, as rows: sorted by
    where the strategies differ most (max − min accuracy), at most `limit` of them."""
    spread = matrix.max(axis=0) - matrix.min(axis=0) if len(matrix) else np.zeros(0)
    order = sorted(range(matrix.shape[1]), key=lambda c: (-float(spread[c]), c))
    return order[:limit]


def plot_per_class_heatmap(
    strategies: Sequence[str], classes: Sequence[str], matrix: np.ndarray, path: Path,
    marked: np.ndarray | None = None, note: str = "",
) -> Path:
    """Classes × strategies test accuracy (mean over seeds): classes as rows, sorted by where
    the strategies differ most, and past MAX_CLASS_ROWS only those (per_class.csv has all),
    so 101 classes stay readable; a `*` on the cells `marked` (differs from the best strategy
    beyond noise), explained by `note` under the plot."""
    shown = heatmap_rows(matrix)
    part = matrix[:, shown].T
    stars = marked[:, shown].T if marked is not None else None
    rows, cols = part.shape
    figure = _figure(figsize=(max(6.0, 1.1 * cols + 4), max(3.0, 0.28 * rows + 2)),
                    layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(100 * part, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    axes.set_xticks(range(cols))
    axes.set_xticklabels(strategies, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(rows))
    axes.set_yticklabels([classes[c] for c in shown], fontsize=8)
    for i in range(rows):
        for j in range(cols):
            value = 100 * part[i, j]
            star = "*" if stars is not None and stars[i, j] else ""
            axes.text(j, i, f"{value:.0f}{star}", ha="center", va="center", fontsize=7,
                      color="black" if value > 60 else "white")
    title = "per-class test accuracy, classes where the strategies differ most first"
    if len(shown) < len(classes):
        title += f" ({len(shown)} of {len(classes)}; all in per_class.csv)"
    width = max(60, int(10 * figure.get_figwidth()))  # characters that fit across the figure
    axes.set_title("\n".join([*textwrap.wrap(title, width), *textwrap.wrap(note, width)]),
                   fontsize=9)
    atomic_write(path, lambda file: figure.savefig(file, dpi=110, format="png"))
    return path
