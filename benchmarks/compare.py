"""Compare freezing strategies on one dataset and backbone, with the same data split, epochs, lr
and seeds for all, and print a Markdown table.

    python -m benchmarks.compare --data ../shared/data/ucmerced     # quick preset, 2-core CPU
    python -m benchmarks.compare --preset reference --data nature_12K.zip   # ResNet50, GPU
    python -m benchmarks.compare --data DIR --seeds 3 \\
        --strategies last-layer,lp-ft,freeze-fraction:fraction=0.5:count=numel

A strategy is a registry name (`finetune.STRATEGIES`) or an alias (`freeze-80`, `from-scratch`),
optionally followed by `:key=value` options; `+` joins tuple items
(`freeze-all-but:groups=layer4+head`).
Rows are written to the output folder as each run finishes, so a crash or Ctrl-C keeps them and
`--resume` skips them. See docs/benchmarks.md for what each column measures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import gc
import json
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import finetune
from benchmarks import plots
from finetune import STRATEGIES, Backbone, FreezeStrategy, ImageFolderData, TrainConfig, Trainer
from finetune.backbone import TORCHVISION_ARCHITECTURES, hub_checkpoint_path
from finetune.callbacks import Callback, ProgressBar, WandbLogger
from finetune.data import INaturalist12K, default_cache_root
from finetune.errors import FinetuneError
from finetune.functional import build_backbone

BackboneFactory = Callable[[str, int, bool], Backbone]
DEFAULT_STRATEGIES = ("last-layer", "freeze-80", "full-unfreeze", "freeze-head-only",
                      "from-scratch")
# alias -> (registry name, default options, pretrained weights?)
ALIASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "freeze-80": ("freeze-fraction", {"fraction": 0.8}, True),
    "from-scratch": ("full-unfreeze", {}, False),
}
PRESETS: dict[str, dict[str, Any]] = {
    # The reference work: ResNet50 ImageNet weights, iNaturalist 12K, 224 px, batch 32, Adam.
    "reference": {"backbone": "resnet50", "epochs": 5, "train_per_class": None, "val_split": 0.2,
                  "image_size": 224, "batch_size": 32, "lr": 1e-4, "pre_resize": True},
    # Minutes on a 2-core CPU: 20 images per class (16 train + 4 val), 160 px, 3 epochs, batch
    # 16 for more steps per image; Adam at 5e-4 so a linear probe gets somewhere in 60 steps
    # without wrecking full fine-tuning. The test set is always the whole test/val folder.
    "quick": {"backbone": "auto", "epochs": 3, "train_per_class": 20, "val_split": 0.2,
              "image_size": 160, "batch_size": 16, "lr": 5e-4, "pre_resize": False},
}
# Settings that must match for --resume to reuse rows.
RESUME_KEYS = ("backbone", "data", "epochs", "train_per_class", "val_split", "image_size",
               "batch_size", "lr", "precision", "device")


# -- arguments and settings ---------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--data", help="iNaturalist zip, its folder, or an ImageFolder tree with "
                   "train/ and test/ or val/; default: iNaturalist 12K in the cache folder")
    p.add_argument("--backbone", help="lite0, efficientnet_lite0, or one of "
                   + ", ".join(sorted(TORCHVISION_ARCHITECTURES)))
    p.add_argument("--strategies", nargs="+", help="comma- or space-separated; default: "
                   + ",".join(DEFAULT_STRATEGIES))
    p.add_argument("--seeds", type=int, default=1, help="runs per strategy (seeds 0..N-1)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-per-class", type=int, help="images per class before the val split")
    p.add_argument("--val-split", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="data loader workers (default: library's)")
    p.add_argument("--output", default="runs/compare", help="folder for results and plots")
    p.add_argument("--resume", action="store_true", help="skip runs already in --output")
    p.add_argument("--wandb", action="store_true", help="log each run to wandb (offline "
                   "without an API key), all in one group")
    p.add_argument("--wandb-project", default="finetune-compare")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with the command line's overrides on top; every choice ends up here, is
    printed at the start and stored in results.json."""
    settings = dict(PRESETS[args.preset], preset=args.preset)
    for key in ("backbone", "epochs", "train_per_class", "val_split", "image_size",
                "batch_size", "lr"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["backbone"] == "auto":
        cached = hub_checkpoint_path(torchvision.models.ResNet50_Weights.DEFAULT.url).exists()
        settings["backbone"] = "resnet50" if cached else "efficientnet_lite0"
        settings["backbone_choice"] = ("ResNet50 weights found in the torch hub cache" if cached
                                       else "ResNet50 weights not cached: packaged Lite0 weights")
    if settings["backbone"] == "lite0":
        settings["backbone"] = "efficientnet_lite0"
    specs = [s for item in (args.strategies or DEFAULT_STRATEGIES) for s in item.split(",") if s]
    for spec in specs:
        try:
            parse_strategy(spec)  # fail on a typo before anything trains
        except ValueError as error:
            raise SystemExit(f"--strategies: {error}") from None
    settings.update(strategies=specs, seeds=list(range(args.seeds)), precision=args.precision,
                    device=args.device, workers=args.workers)
    return settings


def parse_strategy(spec: str) -> tuple[FreezeStrategy, bool]:
    """`name[:key=value]...` (or an alias) -> (strategy, whether the backbone starts from
    pretrained weights)."""
    name, colon, rest = spec.partition(":")
    if name in ALIASES:  # the alias's options first, so the spec's own ones override them
        base, options, pretrained = ALIASES[name]
        defaults = "".join(f":{key}={value}" for key, value in options.items())
        return finetune.parse_strategy(base + defaults + colon + rest), pretrained
    try:
        return finetune.parse_strategy(spec), True
    except ValueError as error:
        if str(error).startswith("unknown strategy"):
            raise ValueError(f"unknown strategy '{name}' in '{spec}'; choose one of "
                             f"{', '.join(sorted([*STRATEGIES, *ALIASES]))}") from None
        raise


def make_backbone(name: str, num_classes: int, pretrained: bool) -> Backbone:
    """The default backbone factory (any name the CLI takes); `main(backbone_factory=...)`
    swaps it (tests: a tiny one)."""
    return build_backbone(name, num_classes, weights="DEFAULT" if pretrained else None)


def resolve_data(data: str | None) -> Path:
    """--data as given, else iNaturalist 12K in the cache folder (downloaded if possible)."""
    if data:
        return Path(data).expanduser().resolve()
    root = default_cache_root() / "inaturalist"
    try:
        return INaturalist12K.download(root, progress=sys.stderr.isatty())
    except (FinetuneError, OSError) as error:
        raise SystemExit(
            f"no --data given, and iNaturalist 12K is not in {root} and could not be downloaded "
            f"from {INaturalist12K.URL} ({error}).\nPass the data instead: --data "
            "/path/to/nature_12K.zip (or its extracted folder), or any ImageFolder tree with "
            "train/ and val/ (or test/), e.g. --data ../shared/data/ucmerced"
        ) from None


def build_data(settings: dict[str, Any], root: Path, backbone: Backbone) -> ImageFolderData:
    """One split for every strategy and seed (split seed 0); the test set is the tree's
    test/ or val/ folder, and val is carved out of train."""
    return ImageFolderData(
        root, val_split=settings["val_split"], seed=0, batch_size=settings["batch_size"],
        backbone=backbone, image_size=settings["image_size"], num_workers=settings["workers"],
        train_per_class=settings["train_per_class"], pre_resize=settings["pre_resize"],
        progress=sys.stderr.isatty(),
    )


# -- measuring ----------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of the code inside the `with`, in MiB, and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only). CPU: the peak resident set size of
    this process above its RSS at entry — Linux's VmHWM, reset via /proc/self/clear_refs; else
    psutil polled every 20 ms. Freed heap is handed back first (malloc_trim) so one run's
    leftovers do not hide the next one's growth. Data-loader worker processes are not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib, self.method = device, float("nan"), "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = self._base = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.method = torch.cuda.memory_allocated(self.device), "cuda allocated"
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._base, self.method = _proc_status_kib("VmRSS") * 1024, "rss (VmHWM)"
        except OSError:
            import psutil

            process = psutil.Process()
            self._base = self._peak = process.memory_info().rss
            self.method = "rss (psutil poll)"
            self._thread = threading.Thread(target=self._poll, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _poll(self, process: Any) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.mib = (peak - self._base) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


# -- one run ------------------------------------------------------------------------------------
def run_one(spec: str, seed: int, settings: dict[str, Any], data: ImageFolderData,
            backbone_factory: BackboneFactory, output: Path) -> dict[str, Any]:
    """Train `spec` with `seed` on the shared split; return its results row."""
    strategy, pretrained = parse_strategy(spec)
    torch.manual_seed(seed)  # the new head (and from-scratch weights) depend on the seed
    backbone = backbone_factory(settings["backbone"], len(data.classes), pretrained)
    config = TrainConfig(epochs=settings["epochs"], lr=settings["lr"], seed=seed,
                         precision=settings["precision"], device=settings["device"])
    callbacks: list[Callback] = []
    if sys.stderr.isatty():
        callbacks.append(ProgressBar())
    if settings.get("wandb_group"):
        callbacks.append(WandbLogger(
            project=settings["wandb_project"], name=f"{spec} seed{seed}",
            group=settings["wandb_group"], config={"compare": settings}, dir=str(output)))
    trainer = Trainer(backbone, strategy, config, callbacks, classes=data.classes)
    shuffled = copy.copy(data)  # same split; the shuffle and augmentation follow the run seed
    shuffled.seed = seed
    with PeakMemory(torch.device("cuda") if (settings["device"] != "cpu"
                                             and torch.cuda.is_available())
                    else torch.device("cpu")) as memory:
        history = trainer.fit(shuffled.train_loader(), data.val_loader())
        test = trainer.evaluate(data.test_loader())
    freeze = trainer.state.freeze_report
    assert freeze is not None  # fit() always applies the strategy
    last = history.records[-1]
    return {
        "strategy": spec, "seed": seed, "strategy_state": strategy.state_dict(),
        "pretrained": pretrained, "backbone": backbone.name, "weights": backbone.weights,
        "trainable_params": freeze.trainable_params, "total_params": freeze.total_params,
        "trainable_pct": 100 * freeze.trainable_fraction,
        "val_accuracy": last["val_accuracy"], "best_val_accuracy": max(history["val_accuracy"]),
        "test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1,
        "epochs": len(history), "seconds_per_epoch": statistics.fmean(history["epoch_seconds"]),
        "train_seconds_per_epoch": statistics.fmean(history["train_seconds"]),
        "images_per_second": sum(history["train_images"]) / max(sum(history["train_seconds"]),
                                                                1e-9),
        "peak_memory_mib": memory.mib, "memory_measure": memory.method,
        "precision": trainer.state.precision, "device": str(trainer.state.device),
        "train_images": len(data.train_samples), "val_images": len(data.val_samples),
        "test_images": len(data.test_samples),
        "per_class_test_accuracy": dict(zip(data.classes, map(float, test.per_class_accuracy),
                                            strict=True)),
        "history": history.records, "config": settings,
    }


# -- outputs ------------------------------------------------------------------------------------
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
        summary.append(row)
    return summary


def markdown_table(summary: list[dict[str, Any]]) -> str:
    def accuracy(s: dict[str, Any], key: str) -> str:
        text = f"{100 * s[key]:.1f}"
        return text + (f" ± {100 * s[key + '_std']:.1f}" if s["runs"] > 1 else "")

    lines = ["| strategy | trainable params | val acc (%) | test acc (%) | s / epoch | "
             "train img/s | peak mem (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['strategy']} | {s['trainable_params']:,} ({s['trainable_pct']:.1f}%) | "
              f"{accuracy(s, 'val_accuracy')} | {accuracy(s, 'test_accuracy')} | "
              f"{s['seconds_per_epoch']:.1f} | {s['images_per_second']:.1f} | "
              f"{s['peak_memory_mib']:.0f} |" for s in summary]
    return "\n".join(lines)


def per_class_matrix(rows: list[dict[str, Any]], strategies: Sequence[str],
                     classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = [s for s in strategies if any(r["strategy"] == s for r in rows)]
    matrix = np.array([[statistics.fmean(r["per_class_test_accuracy"][c] for r in rows
                                         if r["strategy"] == s) for c in classes] for s in names])
    return names, matrix.reshape(len(names), len(classes))


def write_outputs(output: Path, settings: dict[str, Any], classes: Sequence[str],
                  rows: list[dict[str, Any]], failed: list[dict[str, Any]],
                  draw: bool = True) -> str:
    """(Re)write every output file from the rows so far; returns the Markdown table. The
    PNGs take seconds, so runs in progress skip them (`draw=False`) and the end draws them."""
    order = {(s, seed): i for i, (s, seed) in enumerate(
        (s, seed) for s in settings["strategies"] for seed in settings["seeds"])}
    rows.sort(key=lambda r: order.get((r["strategy"], r["seed"]), len(order)))
    _atomic_write(output / "results.json", json.dumps(
        {"config": settings, "classes": list(classes), "rows": rows, "failed": failed},
        indent=2, default=str))
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, (dict, list))},
             **{f"config.{k}": v for k, v in settings.items()}} for r in rows]
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(flat[0]) if flat else ["strategy"])
        writer.writeheader()
        writer.writerows(flat)
    summary = summarize(rows, settings["strategies"])
    table = markdown_table(summary)
    header = (f"`{settings['command']}`\n\nbackbone {settings['backbone']} · data "
              f"{settings['data']} · {settings['epochs']} epochs · lr {settings['lr']} · "
              f"{settings['image_size']} px · batch {settings['batch_size']} · seeds "
              f"{settings['seeds']}\n\n")
    (output / "results.md").write_text(header + table + "\n")
    names, matrix = per_class_matrix(rows, settings["strategies"], classes)
    with open(output / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", *classes])
        writer.writerows([name, *(f"{v:.4f}" for v in values)]
                         for name, values in zip(names, matrix, strict=True))
    (output / "per_class.md").write_text("\n".join(
        ["| strategy | " + " | ".join(classes) + " |", "|---" + "|---:" * len(classes) + "|"]
        + [f"| {n} | " + " | ".join(f"{100 * v:.0f}" for v in vals) + " |"
           for n, vals in zip(names, matrix, strict=True)]) + "\n")
    if summary and draw:
        plots.plot_accuracy(summary, output / "accuracy.png")
        plots.plot_accuracy_vs_time(summary, output / "accuracy_vs_time.png")
        plots.plot_per_class_heatmap(names, classes, matrix, output / "per_class_heatmap.png")
    return table


def _atomic_write(path: Path, text: str) -> None:
    """Write beside, then rename: a Ctrl-C mid-write never leaves a truncated results.json."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def load_previous(output: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run in `output` with the same settings (for --resume)."""
    path = output / "results.json"
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    changed = [k for k in RESUME_KEYS if previous["config"].get(k) != settings.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {previous['config'].get(k)!r} -> {settings.get(k)!r}"
                         for k in changed)
        raise SystemExit(f"--resume: {path} was made with other settings ({diff}); use another "
                         "--output or the same settings.")
    return list(previous["rows"])


# -- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None,
         backbone_factory: BackboneFactory = make_backbone) -> int:
    """Run every strategy × seed; returns 0, 1 if a run failed, 130 on Ctrl-C."""
    args = parse_args(argv)
    settings = resolve_settings(args)
    settings["command"] = "python -m benchmarks.compare " + " ".join(
        sys.argv[1:] if argv is None else argv)
    settings["data"] = str(resolve_data(args.data))
    if args.wandb:
        settings.update(wandb_project=args.wandb_project,
                        wandb_group=f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = load_previous(output, settings) if args.resume else []
    for key, value in settings.items():
        print(f"{key:>16}: {value}")
    probe = backbone_factory(settings["backbone"], 2, True)  # for its preprocessing only
    data = build_data(settings, Path(settings["data"]), probe)
    print(f"{'split':>16}: {len(data.classes)} classes · {len(data.train_samples)} train · "
          f"{len(data.val_samples)} val · {len(data.test_samples)} test images")
    done = {(r["strategy"], r["seed"]) for r in rows}
    failed: list[dict[str, Any]] = []
    runs = [(s, seed) for s in settings["strategies"] for seed in settings["seeds"]]
    for index, (spec, seed) in enumerate(runs, start=1):
        tag = f"[{index}/{len(runs)}] {spec} seed {seed}"
        if (spec, seed) in done:
            print(f"{tag}: already in {output / 'results.json'}, skipped (--resume)")
            continue
        try:
            row = run_one(spec, seed, settings, data, backbone_factory, output)
        except KeyboardInterrupt:
            write_outputs(output, settings, data.classes, rows, failed)
            print(f"{tag}: interrupted; {len(rows)} finished runs kept in {output}. Continue "
                  "with the same command plus --resume.", file=sys.stderr)
            return 130
        except Exception as error:
            traceback.print_exc()
            failed.append({"strategy": spec, "seed": seed, "error": repr(error)})
            print(f"{tag}: FAILED ({error}); continuing with the others", file=sys.stderr)
            write_outputs(output, settings, data.classes, rows, failed, draw=False)
            continue
        rows.append(row)
        write_outputs(output, settings, data.classes, rows, failed, draw=False)
        print(f"{tag}: val {100 * row['val_accuracy']:.1f}% · test "
              f"{100 * row['test_accuracy']:.1f}% · {row['seconds_per_epoch']:.1f} s/epoch · "
              f"{row['images_per_second']:.1f} img/s · peak +{row['peak_memory_mib']:.0f} MiB · "
              f"{row['trainable_params']:,} trainable ({row['trainable_pct']:.1f}%) · "
              f"{row['precision']}", flush=True)
    print("\n" + write_outputs(output, settings, data.classes, rows, failed))
    print(f"\nresults in {output}/ (results.json, results.csv, results.md, per_class.*, *.png)")
    if failed:
        print(f"{len(failed)} run(s) failed: {[f['strategy'] for f in failed]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
