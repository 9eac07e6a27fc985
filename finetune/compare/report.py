"""What a comparison writes: results.json/.csv/.md, pairwise.csv/.md, per_class.csv/.md and
the plots, each rewritten atomically (`finetune.atomic`) from the rows so far, so a crash keeps
what finished; and the rows an earlier run left, for --resume. The intervals, pairwise tests
and verdict come from the stored test predictions (`finetune.compare.noise`)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import finetune.compare.noise as noise
import finetune.compare.plots as plots
from finetune.atomic import atomic_write_text
from finetune.compare.hindsight import hindsight_markdown, summarize_hindsight
from finetune.compare.row import Row
from finetune.compare.settings import Settings
from finetune.train.recipes import describe


def summarize(rows: list[dict[str, Any]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """One row per strategy: accuracies as mean and std over seeds, costs as means."""
    summary = []
    for spec in strategies:
        runs = [r for r in rows if r["strategy"] == spec]
        if not runs:
            continue
        row: dict[str, Any] = {"strategy": spec, "runs": len(runs), "epochs": runs[0]["epochs"],
                               "trainable_params": runs[0]["trainable_params"],
                               "trainable_pct": runs[0]["trainable_pct"]}
        for key in ("val_accuracy", "test_accuracy"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("seconds_per_epoch", "images_per_second", "peak_memory_mib"):
            row[key] = statistics.fmean(r[key] for r in runs)
        row["lr"] = sorted({r["lr"] for r in runs if r.get("lr") is not None})
        if any(r.get("advice") for r in runs):  # the advised row: what it trained, and the
            row["advised"] = sorted({r["advice"]["strategy"] for r in runs})  # advice's time
            row["advise_seconds"] = statistics.fmean(r["advise_seconds"] for r in runs)
        summary.append(row)
    return summary


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """Accuracies as mean ± std over seeds; the test accuracy's 95% interval (over test images
    and seeds) where the rows had predictions to compute it from."""
    def accuracy(s: dict[str, Any], key: str) -> str:
        text = f"{100 * s[key]:.1f}"
        return text + (f" ± {100 * s[key + '_std']:.1f}" if s["runs"] > 1 else "")

    def interval(s: dict[str, Any]) -> str:
        bounds = s.get("test_accuracy_ci95")
        return noise.percent_interval(bounds) if bounds else "–"

    def learning_rate(s: dict[str, Any]) -> str:
        return " / ".join(f"{lr:g}" for lr in s.get("lr") or []) or "–"

    lines = ["| strategy | lr | trainable params | val acc (%) | test acc (%) | 95% CI | runs | "
             "s / epoch | train img/s | peak mem (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def name(s: dict[str, Any]) -> str:
        return s["strategy"] + (f" ({', '.join(s['advised'])})" if s.get("advised") else "")

    lines += [f"| {name(s)} | {learning_rate(s)} | "
              f"{s['trainable_params']:,} ({s['trainable_pct']:.1f}%) | "
              f"{accuracy(s, 'val_accuracy')} | {accuracy(s, 'test_accuracy')} | "
              f"{interval(s)} | {s['runs']} | {s['seconds_per_epoch']:.1f} | "
              f"{s['images_per_second']:.1f} | {s['peak_memory_mib']:.0f} |" for s in summary]
    return "\n".join(lines)


def per_class_matrix(rows: list[dict[str, Any]], strategies: Sequence[str],
                     classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = [s for s in strategies if any(r["strategy"] == s for r in rows)]
    matrix = np.array([[statistics.fmean(r["per_class_test_accuracy"][c] for r in rows
                                         if r["strategy"] == s) for c in classes] for s in names])
    return names, matrix.reshape(len(names), len(classes))


def write_outputs(output: Path, settings: Settings, classes: Sequence[str],
                  rows: list[Row], failed: list[Row],
                  draw: bool = True, targets: Sequence[int] | None = None,
                  hindsight: Sequence[dict[str, Any]] = ()) -> str:
    """(Re)write every output file from the rows so far; returns the Markdown table and the
    verdict. The PNGs and the per-class tests take seconds, so runs in progress skip them
    (`draw=False`) and the end does them. `targets`: the test labels, in the order of each
    row's `test_predictions`. Rows may be mappings as results.json holds them (made `Row`s
    here, in place). `hindsight`: the fixed-lr measurements of `--hindsight`, written
    apart from the rows (never in the table or the verdict)."""
    config = settings.to_dict()
    rows[:] = [row if isinstance(row, Row) else Row.from_dict(row) for row in rows]
    failed = [row if isinstance(row, Row) else Row.from_dict(row) for row in failed]
    strategy_order = {name: i for i, name in enumerate(settings.strategies)}
    rows.sort(key=lambda r: (strategy_order.get(r["strategy"], len(strategy_order)), r["seed"]))
    if targets is not None:  # rows resumed from a run that stored predictions only
        rows[:] = [row.evolve(**noise.run_intervals(targets, row.test_predictions, len(classes)))
                   if row.test_predictions is not None and row.test_accuracy_ci95 is None
                   else row for row in rows]
    summary = summarize(rows, settings.strategies)
    analysis = noise.analyze(rows, summary, targets, classes, per_class=draw)
    if analysis is not None:
        for entry in summary:
            entry.update(analysis.intervals[entry["strategy"]])
    measured = (summarize_hindsight(rows, hindsight, targets)
                if hindsight and targets is not None else [])
    atomic_write_text(output / "results.json", json.dumps(
        {"config": config, "classes": list(classes), "rows": [r.to_dict() for r in rows],
         "failed": [f.to_dict() for f in failed],
         "test_targets": None if targets is None else list(targets), "summary": summary,
         **(analysis.to_dict() if analysis is not None else {}),
         **({"hindsight": {"rows": list(hindsight), "summary": measured}} if hindsight else {})},
        indent=2, default=str))
    if measured:
        atomic_write_text(output / "hindsight.csv", _csv(
            ["label", "strategy", "lr", "test_accuracy", "best_in_hindsight"],
            [["hindsight", s["strategy"], lr, value, float(lr) == s["best_lr"]]
             for s in measured for lr, value in s["fixed"].items()]))
    # one fixed header: every field of a row, then the comparison's settings; failed and
    # advised rows fill what they have, each value under its own column
    settings_columns = {f"config.{key}": value for key, value in config.items()}
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*Row.csv_columns(), *settings_columns])
    writer.writeheader()
    writer.writerows({**row.csv_values(), **settings_columns} for row in [*rows, *failed])
    atomic_write_text(output / "results.csv", buffer.getvalue())
    table = markdown_table(summary)
    verdict = analysis.verdict.text if analysis is not None else ""
    if analysis is not None and settings.tune == "lr":
        verdict += " " + tuning_note(rows, settings)
    if analysis is not None:
        verdict += advice_note(rows)
    seeds = ("auto (per strategy: the runs column)" if settings.seeds_auto
             else str(list(settings.seeds)))
    lr = (f"lr tuned per row on validation ({settings.select}) from "
          f"{', '.join(f'{v:g}' for v in settings.lr_grid)}"
          if settings.tune == "lr" else "lr per row from the lr range test (fastai's valley)"
          if settings.tune == "lr-find" else f"lr {settings.lr} for every row (untuned)")
    header = (f"`{settings.command}`\n\nbackbone {settings.backbone} · data "
              f"{settings.data} · {settings.epochs} epochs · {lr} · "
              f"{settings.image_size} px · batch {settings.batch_size} · seeds {seeds}"
              f"{_shared_machine(settings)}\n\n{recipes_line(settings)}")
    pairwise = "" if analysis is None else noise.pairwise_markdown(analysis.pairs)
    atomic_write_text(output / "results.md", header + table + "\n" + (
        f"\n{verdict}\n\nPairwise differences of test accuracy (points):\n\n{pairwise}\n"
        if analysis is not None else "") + (f"\n{hindsight_markdown(measured)}" if measured
                                            else ""))
    if analysis is not None:
        atomic_write_text(output / "pairwise.md", pairwise + "\n")
        atomic_write_text(output / "pairwise.csv", _csv(
            ["a", "b", "difference", "ci95_low", "ci95_high", "p_value", "p_unadjusted",
             "significant"],
            [[p.a, p.b, p.difference.value, p.difference.low, p.difference.high, p.p_adjusted,
              p.difference.p_value, p.significant] for p in analysis.pairs]))
    names, matrix = per_class_matrix(rows, settings.strategies, classes)
    marks = analysis.classes if analysis is not None else None
    star = marks.marked if marks is not None else np.zeros(matrix.shape, dtype=bool)
    atomic_write_text(output / "per_class.csv", _csv(
        ["strategy", *classes], [[name, *(f"{v:.4f}" for v in values)]
                                 for name, values in zip(names, matrix, strict=True)]))
    atomic_write_text(output / "per_class.md", "\n".join(
        ["| strategy | " + " | ".join(classes) + " |", "|---" + "|---:" * len(classes) + "|"]
        + [f"| {n} | " + " | ".join(f"{100 * v:.0f}{'*' if m else ''}"
                                    for v, m in zip(vals, marked, strict=True)) + " |"
           for n, vals, marked in zip(names, matrix, star, strict=True)])
        + "\n\n" + noise.class_marks_note(marks) + "\n")
    if summary and draw and not plots.available():
        print(plots.MISSING)
    elif summary and draw:
        plots.plot_accuracy(summary, output / "accuracy.png")
        plots.plot_accuracy_vs_time(summary, output / "accuracy_vs_time.png")
        plots.plot_per_class_heatmap(names, classes, matrix, output / "per_class_heatmap.png",
                                     star if marks is not None else None,
                                     noise.class_marks_note(marks))
    return table + (f"\n\n{verdict}" if verdict else "") + (
        f"\n\n{hindsight_markdown(measured)}" if measured else "")


def recipes_line(settings: Settings) -> str:
    """The training recipes every row used, as the line above the table ("" for none)."""
    parts = describe(settings.to_dict())
    return ("Recipes: " + "; ".join(parts) + ".\n\n") if parts else ""


def tuning_note(rows: Sequence[dict[str, Any]], settings: Settings) -> str:
    """What tuning did and cost, in words: the line under a tuned comparison's verdict."""
    tuned = [r["tuning"] for r in rows if r.get("tuning")]
    if not tuned:
        return ""
    epochs = sum(c["epochs"] for t in tuned for c in t["candidates"])
    seconds = sum(t["seconds"] for t in tuned)
    return (f"Each row trained at its own lr, chosen on the validation split from "
            f"{', '.join(f'{v:g}' for v in settings.lr_grid)} (grown past an edge that won; "
            "each lr raced the best run so far and stopped once behind it beyond noise; "
            f"chosen by validation {settings.select}); the test set "
            f"was evaluated once per row, for the chosen lr. The search trained "
            f"{epochs / max(1, settings.epochs * len(tuned)):.1f}x the epochs of untuned "
            f"rows ({epochs:.1f} candidate epochs for {len(tuned)} rows) in {seconds:.0f} s of "
            "run time, the rows' own training included.")


def advice_note(rows: Sequence[dict[str, Any]]) -> str:
    """What the advised row trained, per seed, and what the advice cost (its time is added to
    the row's in accuracy_vs_time.png)."""
    advised = [r for r in rows if r.get("advice")]
    if not advised:
        return ""
    picks = "; ".join(f"seed {r['seed']}: {r['advice']['strategy']} (lr {r['advice']['lr']:g})"
                      for r in advised)
    seconds = statistics.fmean(r["advise_seconds"] for r in advised)
    return (f"\n\nThe advised row trained what `finetune advise` recommended on the same "
            f"train and validation data ({picks}); the advice took {seconds:.0f} s per seed, "
            "added to its training time in accuracy_vs_time.png.")


def _shared_machine(settings: Settings) -> str:
    """How the runs shared the machine, which their times depend on."""
    if settings.jobs <= 1:
        return ""
    return (f" · {settings.jobs} runs at once, sharing the CPU's cores (times are those of a "
            "shared machine)")


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def load_previous(output: Path, settings: Settings) -> list[Row]:
    """Rows of an earlier run in `output` with the same settings (for --resume)."""
    path = output / "results.json"
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    changed = settings.changed_from(previous["config"])
    if changed:
        raise SystemExit(f"--resume: {path} was made with other settings ({', '.join(changed)}); "
                         "use another --output or the same settings.")
    return [Row.from_dict(row) for row in previous["rows"]]
