"""How the lr search should decide on small validation sets: every criterion and stopping rule
replayed on the same trained runs, against the best fixed lr in hindsight.

For each strategy and seed, every lr of a grid trains all epochs at a fixed lr (as
`finetune compare --tune none --lr X` would), scored on validation at the race's peek and
at each epoch's end (each image's cross-entropy and correctness), and once on test. A search
is then replayed on those records — `LrSearch.search` itself, with a race that reads the
records instead of training — for each rule:
- loss / accuracy+loss / accuracy: the criterion, a challenger stopped only when behind beyond
  noise (`Selection.behind`, paired per-image differences: by more than 1 standard error, or
  the bound named) and taken only when ahead by more than 1.64 ("any lead": when ahead at
  all);
- previous: the race before this change (accuracy; stopped on any dip at an epoch's end, or
  when not ahead at the peek).
A replayed candidate follows its recorded fit exactly up to where the rule stops it (the peek
forks the random state, so the fit does not depend on being watched). Reported per strategy:
the chosen lr's test accuracy (mean over seeds), the untuned row (the preset's lr), the best
fixed lr in hindsight, paired differences over the seeds' test images, and the search's cost
in epochs relative to one untuned run.

    python -m benchmarks.selection --data sample --strategies last-layer,freeze-80 --seeds 3

`--data` as `finetune compare` takes it; the quick preset's settings (Lite0, 20 images per
class, 160 px, 3 epochs, un-augmented, lr 5e-4 and its grid).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from benchmarks.measured import cpu_label, write_measurement
from finetune import Trainer
from finetune.compare.hindsight import paired_points
from finetune.compare.run import (
    loaders_for,
    make_backbone,
    resolve_data,
    scan_data,
)
from finetune.compare.settings import parse_args, parse_run, resolve_settings
from finetune.model.zoo import seeded
from finetune.tuning.search import PEEK, LrSearch, Race, Score, Selection, _Run, ahead, stops

# name -> the search's selection (None: the previous race); z in standard errors
RULES: dict[str, Any] = {
    "loss": Selection("loss"), "loss, stop at 1.64": Selection("loss", stop_z=1.64),
    "loss, stop at 0.5": Selection("loss", stop_z=0.5),
    "loss, any lead": Selection("loss", switch_z=None),
    "loss, 1.64 both ways, any lead": Selection("loss", stop_z=1.64, switch_z=None),
    "accuracy+loss": Selection("accuracy+loss"), "accuracy": Selection("accuracy"),
    "accuracy, any lead": Selection("accuracy", switch_z=None), "previous": None}
LRS = (5e-5, 1.6e-4, 5e-4, 1.6e-3, 5e-3, 1.6e-2)


@attrs.frozen
class Previous:
    """The race before noise-aware stopping: accuracy decides; at the peek a challenger must
    lead (a tie to the lower loss), at an epoch's end any tie or dip stops it."""

    criterion: str = "previous"
    z: float = 0.0

    def better(self, ours: Score, theirs: Score) -> bool:
        return ours.accuracy > theirs.accuracy

    def stops(self, run: _Run, point: float, rival: _Run | None) -> bool:
        theirs = rival.scores.get(point) if rival is not None else None
        if theirs is None:
            return False
        ours = run.scores[point]
        if point < 1:
            return not ahead((ours.accuracy, ours.loss), (theirs.accuracy, theirs.loss))
        return ours.accuracy <= theirs.accuracy


# -- training every lr once ----------------------------------------------------------------------
def record_runs(settings: Any, strategy: str, seed: int, lrs: Sequence[float], splits: Any
                ) -> dict[float, dict[str, Any]]:
    """Each lr trained in full at a fixed lr: its validation scores by point, its test
    correctness, and its seconds."""
    with seeded(seed):
        initial = make_backbone(settings.backbone, len(splits.classes),
                                parse_run(strategy).pretrained)
    data = loaders_for(splits, settings, initial)
    train, val = data.train_loader(shuffle_seed=seed), data.val_loader()
    records = {}
    for lr in lrs:
        run = _Run(lr)
        trainer = Trainer(copy.deepcopy(initial), copy.deepcopy(parse_run(strategy).strategy),
                          settings.train_config(seed, lr),
                          [Race(run, val, None, PEEK)], classes=data.classes)
        started = time.perf_counter()
        trainer.fit(train, val)
        seconds = time.perf_counter() - started
        test = trainer.evaluate(data.test_loader())
        records[lr] = {"scores": run.scores, "seconds": seconds,
                       "test_correct": test.predictions == test.targets}
        print(f"{strategy} seed {seed} lr {lr:g}: val {run.last[1].accuracy:.3f} / "
              f"{run.last[1].loss:.3f} · test {test.accuracy:.3f} · {seconds:.1f} s", flush=True)
    return records


# -- replaying a search ----------------------------------------------------------------------------
def replay(rule: str, grid: Sequence[float], epochs: int,
           records: dict[float, dict[str, Any]]) -> tuple[float, float]:
    """(the lr the rule's search chooses, the epochs its candidates trained in all)."""
    selection: Any = RULES[rule] or Previous()
    known = sorted(records)

    def race(lr: float, rival: _Run | None) -> _Run:
        run = _Run(lr)
        for point, score in sorted(records[lr]["scores"].items()):
            run.scores[point] = score
            halted = (selection.stops(run, point, rival) if isinstance(selection, Previous)
                      else stops(selection, run, point, rival))
            if halted:
                break
        return run

    search = LrSearch(grid, epochs, selection=selection, bounds=(known[0], known[-1]))
    best, tried = search.search(race)
    return best.value, sum(r.reached for r in tried)


def to_json(recorded: dict[str, dict[int, dict[float, dict[str, Any]]]]) -> Any:
    """The trained runs as plain data (per-image arrays as lists), to replay later."""
    return {strategy: {str(seed): {repr(lr): {
        "seconds": run["seconds"], "test_correct": run["test_correct"].tolist(),
        "scores": {repr(point): [score.losses.tolist(), score.correct.tolist()]
                   for point, score in run["scores"].items()}}
        for lr, run in runs.items()} for seed, runs in seeds.items()}
        for strategy, seeds in recorded.items()}


def from_json(data: Any) -> dict[str, dict[int, dict[float, dict[str, Any]]]]:
    return {strategy: {int(seed): {float(lr): {
        "seconds": run["seconds"], "test_correct": np.asarray(run["test_correct"]),
        "scores": {float(point): Score(np.asarray(losses), np.asarray(correct))
                   for point, (losses, correct) in run["scores"].items()}}
        for lr, run in runs.items()} for seed, runs in seeds.items()}
        for strategy, seeds in data.items()}


def summarise(strategy: str, seeds: Sequence[int], runs: dict[int, dict[float, dict]],
              grid: Sequence[float], epochs: int, preset_lr: float) -> dict[str, Any]:
    """One strategy's figures over its seeds."""
    def test(seed: int, lr: float) -> np.ndarray:
        return runs[seed][lr]["test_correct"]

    def accuracy(choices: dict[int, float]) -> float:
        return 100 * float(np.mean([test(s, lr).mean() for s, lr in choices.items()]))

    def pooled(choices: dict[int, float]) -> np.ndarray:
        return np.concatenate([test(s, choices[s]) for s in seeds])

    hindsight_lr = max(trained_lrs(runs),
                       key=lambda lr: np.mean([test(s, lr).mean() for s in seeds]))
    fixed = {s: preset_lr for s in seeds}
    hindsight = {s: hindsight_lr for s in seeds}
    out: dict[str, Any] = {"strategy": strategy, "untuned": accuracy(fixed),
                           "hindsight": accuracy(hindsight), "hindsight_lr": hindsight_lr,
                           "fixed": {f"{lr:g}": accuracy({s: lr for s in seeds})
                                     for lr in trained_lrs(runs)}, "rules": {}}
    for rule in RULES:
        replays = {s: replay(rule, grid, epochs, runs[s]) for s in seeds}
        chosen = {s: lr for s, (lr, _) in replays.items()}
        cost = float(np.mean([spent for _, spent in replays.values()])) / epochs
        out["rules"][rule] = {
            "chosen": [f"{chosen[s]:g}" for s in seeds], "test": accuracy(chosen),
            "vs_hindsight": paired_points(pooled(chosen), pooled(hindsight)),
            "vs_untuned": paired_points(pooled(chosen), pooled(fixed)), "epochs_ratio": cost}
    return out


def trained_lrs(runs: dict[int, dict[float, dict]]) -> list[float]:
    return sorted(next(iter(runs.values())))


def markdown(name: str, results: list[dict[str, Any]], counts: dict[str, int]) -> str:
    lines = [f"### {name} ({counts['train']} train · {counts['val']} val · {counts['test']} "
             "test images)", "",
             "| strategy | untuned | hindsight (lr) | rule | chosen lrs | tuned test | vs "
             "hindsight | vs untuned | epochs vs untuned |", "|---|---:|---:|---|---|---:|---:|"
             "---:|---:|"]
    for result in results:
        for rule, figures in result["rules"].items():
            vs_h, vs_u = figures["vs_hindsight"], figures["vs_untuned"]
            lines.append(
                f"| {result['strategy']} | {result['untuned']:.1f} | {result['hindsight']:.1f} "
                f"({result['hindsight_lr']:g}) | {rule} | {', '.join(figures['chosen'])} | "
                f"{figures['test']:.1f} | {vs_h[0]:+.1f} ± {vs_h[1]:.1f} | {vs_u[0]:+.1f} ± "
                f"{vs_u[1]:.1f} | {figures['epochs_ratio']:.2f}x |")
    return "\n".join(lines)


def overall(folder: Path) -> str:
    """Every rule over every measured set and strategy (the selection-*.json in `folder`):
    mean test accuracy, mean gap to the best fixed lr in hindsight and to the untuned row,
    the cells where it is behind hindsight beyond noise, and the mean epochs ratio."""
    cells = [(json.loads(path.read_text()), path.stem.removeprefix("selection-"))
             for path in sorted(folder.glob("selection-*.json"))]
    lines = ["| rule | mean tuned test | vs hindsight | vs untuned | cells behind hindsight "
             "beyond noise | cells below untuned beyond noise | epochs vs untuned |",
             "|---|---:|---:|---:|---|---|---:|"]
    for rule in RULES:
        figures = [(result["rules"][rule], f"{name}/{result['strategy']}")
                   for data, name in cells for result in data["results"]
                   if rule in result["rules"]]
        if not figures:
            continue
        behind = [cell for f, cell in figures
                  if f["vs_hindsight"][0] + f["vs_hindsight"][1] < 0]
        below = [cell for f, cell in figures if f["vs_untuned"][0] + f["vs_untuned"][1] < 0]
        lines.append(
            f"| {rule} | {np.mean([f['test'] for f, _ in figures]):.1f} | "
            f"{np.mean([f['vs_hindsight'][0] for f, _ in figures]):+.2f} | "
            f"{np.mean([f['vs_untuned'][0] for f, _ in figures]):+.2f} | "
            f"{', '.join(behind) or 'none'} | {', '.join(below) or 'none'} | "
            f"{np.mean([f['epochs_ratio'] for f, _ in figures]):.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="as finetune compare (default: sample)")
    parser.add_argument("--strategies", default="last-layer,freeze-80")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="images per class before the val split (default: the quick "
                        "preset's 20; 0: all)")
    parser.add_argument("--output", type=Path, default=Path("selection"))
    parser.add_argument("--name", help="what the outputs are named after (default: the data "
                        "folder and images per class)")
    parser.add_argument("--overall", action="store_true",
                        help="only print every rule over the sets measured in --output")
    parser.add_argument("--replay", action="store_true",
                        help="replay the rules on the runs an earlier call kept in --output "
                        "(records-NAME.pt) instead of training them again")
    args = parser.parse_args(argv)
    if args.overall:
        text = (f"{overall(args.output)}\n\nEach cell: the seeds of one strategy on one set "
                f"(`selection-*.json` in {args.output}); CPU: {cpu_label()}.")
        write_measurement(args.output, "overall", text, {"table": text},
                          "benchmarks.selection", argv)
        return 0
    compare_args = ["--tune", "lr", "--jobs", "1", "--workers", "0"]
    if args.data:
        compare_args += ["--data", args.data]
    if args.train_per_class:
        compare_args += ["--train-per-class", str(args.train_per_class)]
    settings = resolve_settings(parse_args(compare_args), args.strategies.split(","),
                                str(resolve_data(args.data)), "selection")
    if args.train_per_class == 0:
        settings = settings.evolve(train_per_class=None)
    lrs = tuple(float(v) for v in args.lrs.split(","))
    splits = scan_data(settings, Path(settings.data))
    counts = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    seeds = list(range(args.seeds))
    name = args.name or Path(settings.data).name + (f"-{settings.train_per_class}"
                                                    if settings.train_per_class else "-all")
    kept = args.output / f"records-{name}.json"
    started = time.perf_counter()
    if args.replay:
        recorded = from_json(json.loads(kept.read_text()))
    else:
        recorded = {strategy: {seed: record_runs(settings, strategy, seed, lrs, splits)
                               for seed in seeds} for strategy in settings.strategies}
        args.output.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(to_json(recorded)))
    results = [summarise(strategy, seeds, recorded[strategy], settings.lr_grid,
                         settings.epochs, settings.lr) for strategy in settings.strategies]
    text = (f"{markdown(name, results, counts)}\n\nCPU: {cpu_label()}; every lr trained once "
            f"per strategy and seed in {time.perf_counter() - started:.0f} s.")
    args.output.mkdir(parents=True, exist_ok=True)
    write_measurement(args.output, f"selection-{name}", text,
                      {"data": settings.data, "counts": counts, "results": results},
                      "benchmarks.selection", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
