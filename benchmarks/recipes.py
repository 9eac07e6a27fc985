"""`python -m benchmarks.recipes`: every training recipe against the plain run, per strategy.

Each recipe is one `python -m benchmarks.compare` run (the quick preset, every row at
`--lr`, untuned, so that the recipe alone differs) over the same split, test images and seeds
as the baseline; the table gives each recipe's mean test accuracy per strategy, its paired
difference from the baseline with a 95% interval (test images and seeds resampled together,
`finetune.stats.significance.Bootstrap`), and its training time as a ratio to the baseline's,
measured in the same invocation. The class-balance recipes are measured on a long-tailed copy
of the training split (`--long-tail`: of the quick preset's 20 images per class, class k keeps
a share r^(k/(K-1)), at least 4; links, no copies), since on balanced data they do nothing;
the test set stays whole.

    python -m benchmarks.recipes --data DIR --seeds 3 --output runs/recipes

Reruns reuse finished recipes (`--resume` of each comparison); docs/recipes.md holds the
measured tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measured import cpu_label, write_measurement
from finetune.compare.run import row_seconds
from finetune.data.images import image_files
from finetune.data.sample import resolve_named_data
from finetune.stats.significance import Bootstrap

STRATEGIES = "last-layer,freeze-80,full-unfreeze"
# recipe -> finetune compare flags; the settings are the ones timm / torchvision's references
# use for fine-tuning (EMA decay scaled to a few hundred steps).
RECIPES: dict[str, list[str]] = {
    "baseline": [],
    "flip": ["--augment", "flip"],
    "flip, crops 0.35-1": ["--augment", "flip", "--crop-scale", "0.35"],
    "trivial": ["--augment", "trivial", "--crop-scale", "0.35"],
    "randaugment": ["--augment", "randaugment", "--crop-scale", "0.35"],
    "autoaugment": ["--augment", "autoaugment", "--crop-scale", "0.35"],
    "mixup 0.2": ["--mixup", "0.2"],
    "cutmix 1.0": ["--cutmix", "1.0"],
    "ema 0.99": ["--ema", "0.99"],
    "label smoothing 0.1": ["--label-smoothing", "0.1"],
    "tta flip": ["--tta", "flip"],
    "lr-find": ["--tune", "lr-find"],
    "lr race": ["--tune", "lr"],
}
LONG_TAIL_RECIPES: dict[str, list[str]] = {
    "long-tail baseline": [],
    "long-tail balance sampler": ["--balance", "sampler"],
    "long-tail balance loss": ["--balance", "loss"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="sample", help="as finetune compare --data")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--recipes", default=None,
                   help="comma-separated names (default: all): " + ", ".join(
                       [*RECIPES, *LONG_TAIL_RECIPES]))
    p.add_argument("--long-tail", type=float, default=0.2,
                   help="the rarest class keeps this share of its training images (default: "
                        "0.2)")
    p.add_argument("--output", type=Path, default=Path("runs/recipes"))
    args, compare_flags = p.parse_known_args(argv)
    args.compare_flags = compare_flags  # passed on to every comparison (e.g. --epochs 5)
    return args


PER_CLASS = 20  # the quick preset's training images per class, before the tail
SMALLEST = 4  # the rarest class's floor: its validation split still holds an image


def long_tailed_copy(root: Path, folder: Path, rarest: float) -> Path:
    """A tree of links to `root`'s images: class k of K (sorted) keeps
    ceil(PER_CLASS * rarest^(k/(K-1))) of its first training images (at least SMALLEST), and
    every test image."""
    train = root / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    for k, name in enumerate(classes):
        files = sorted(image_files(train / name))
        share = rarest ** (k / max(1, len(classes) - 1))
        keep = max(SMALLEST, math.ceil(min(PER_CLASS, len(files)) * share))
        _link(files[:keep], folder / "train" / name)
    test = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test is None:
        raise SystemExit(f"{root} has no test/ or val/ folder")
    for name in classes:
        _link(sorted(image_files(test / name)), folder / "test" / name)
    return folder


def _link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        target = folder / file.name
        if not target.exists():
            os.symlink(file.resolve(), target)


def run_recipe(name: str, flags: list[str], data: str, args: argparse.Namespace) -> Path:
    out = args.output / name.replace(" ", "_").replace(",", "")
    resume = ["--resume"] if (out / "results.json").is_file() else []
    command = [sys.executable, "-m", "finetune", "compare", "--data", data, "--strategies",
               args.strategies, "--seeds", str(args.seeds), "--tune", "none",
               "--output", str(out), *resume, *args.compare_flags, *flags]
    if "--tune" in flags:  # the recipe's own tuning replaces "none"
        at = command.index("--tune")
        del command[at:at + 2]
    print(f"== {name}: {' '.join(command[3:])}", flush=True)
    subprocess.run(command, check=True)
    return out


def load_rows(out: Path) -> tuple[list[dict[str, Any]], list[int]]:
    results = json.loads((out / "results.json").read_text())
    return results["rows"], results["test_targets"]


def compare_recipes(measured: dict[str, Path], baseline: str, strategies: list[str]
                    ) -> list[dict[str, Any]]:
    """Per recipe and strategy: mean test accuracy, the paired difference from `baseline`
    with its 95% interval, and the time ratio."""
    base_rows, targets = load_rows(measured[baseline])
    bootstrap = Bootstrap(targets=np.asarray(targets), seed=0)
    table = []
    for name, out in measured.items():
        rows, theirs = load_rows(out)
        if theirs != targets:
            raise SystemExit(f"{name} was tested on other images than {baseline}")
        for strategy in strategies:
            ours = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["seed"])
            base = sorted((r for r in base_rows if r["strategy"] == strategy),
                          key=lambda r: r["seed"])
            if not ours or [r["seed"] for r in ours] != [r["seed"] for r in base]:
                continue
            runs = np.asarray([r["test_predictions"] for r in ours])
            difference = bootstrap.difference(runs, np.asarray([r["test_predictions"]
                                                                 for r in base]))
            accuracies = [100 * r["test_accuracy"] for r in ours]
            table.append({
                "recipe": name, "strategy": strategy, "seeds": len(ours),
                "test_accuracy": float(np.mean(accuracies)),
                "test_accuracy_sd": float(np.std(accuracies, ddof=1)) if len(ours) > 1 else 0.0,
                "difference": 100 * difference.value,
                "difference_ci95": [100 * difference.low, 100 * difference.high],
                "time_ratio": (sum(map(row_seconds, ours))
                               / max(1e-9, sum(map(row_seconds, base)))),
                "lr": [r["lr"] for r in ours],
                "uncached": ours[0].get("train_uncached_reason"),
            })
    return table


def markdown(table: list[dict[str, Any]], strategies: list[str], title: str) -> str:
    lines = [f"**{title}** — test accuracy % (mean over seeds; the baseline ± its SD over "
             "seeds), difference from the baseline in points [95% interval, test images and "
             "seeds resampled; bold where it excludes 0], training time × the baseline's", "",
             "| recipe | " + " | ".join(strategies) + " |",
             "|---|" + "---|" * len(strategies)]
    for recipe in dict.fromkeys(row["recipe"] for row in table):
        cells = []
        for strategy in strategies:
            row = next((r for r in table if r["recipe"] == recipe and r["strategy"] == strategy),
                       None)
            if row is None:
                cells.append("–")
                continue
            if row["recipe"] == table[0]["recipe"]:  # the baseline itself
                cells.append(f"{row['test_accuracy']:.1f} ± {row['test_accuracy_sd']:.1f}")
                continue
            low, high = row["difference_ci95"]
            mark = "**" if low > 0 or high < 0 else ""  # the interval excludes zero
            cells.append(f"{row['test_accuracy']:.1f} ({mark}{row['difference']:+.1f}{mark} "
                         f"[{low:+.1f}, {high:+.1f}]) ×{row['time_ratio']:.1f}")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = args.recipes.split(",") if args.recipes else [*RECIPES, *LONG_TAIL_RECIPES]
    unknown = [n for n in wanted if n not in RECIPES and n not in LONG_TAIL_RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {[*RECIPES, *LONG_TAIL_RECIPES]}")
    strategies = args.strategies.split(",")
    args.output.mkdir(parents=True, exist_ok=True)
    sections = []
    for recipes, baseline, data in (
            (RECIPES, "baseline", args.data),
            (LONG_TAIL_RECIPES, "long-tail baseline", None)):
        names = [n for n in recipes if n in wanted]
        if not names:
            continue
        if data is None:
            root = Path(resolve_named_data(args.data)).resolve()
            data = str(long_tailed_copy(root, args.output / "long_tail_data", args.long_tail))
        measured = {name: run_recipe(name, recipes[name], data, args)
                    for name in dict.fromkeys([baseline, *names])}
        table = compare_recipes(measured, baseline, strategies)
        title = (f"{args.data}" if recipes is RECIPES else
                 f"{args.data}, long-tailed training split (rarest class {args.long_tail:g})")
        sections.append((title, table))
    cpu = cpu_label()
    text = "\n\n".join(markdown(table, strategies, title) for title, table in sections)
    write_measurement(args.output, "recipes", f"{text}\n\nCPU: {cpu}.",
                      {"cpu": cpu, "sections": [{"title": t, "rows": rows}
                                                for t, rows in sections]},
                      "benchmarks.recipes", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
