"""Running a comparison: one split for all, then every strategy × seed on it.

`main` is `python -m benchmarks.compare` (see `finetune compare` for the options).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import finetune.compare.noise as noise
import finetune.compare.plots as plots
import finetune.compare.pool as pool
import finetune.compare.store as store
from finetune import Backbone, ImageFolderData, Trainer
from finetune.atomic import LockBusyError, exclusive_lock
from finetune.cache.plan import ActivationCaches
from finetune.callbacks import Callback, ProgressBar, make_loggers
from finetune.callbacks.console import tolerate_unencodable_output
from finetune.callbacks.early_stopping import early_stopping
from finetune.compare.hindsight import run_hindsight
from finetune.compare.report import load_previous
from finetune.compare.report import write_outputs as _write_outputs
from finetune.compare.row import Row
from finetune.compare.settings import (
    ADVISED,
    LR_FIND_STEPS,
    PROG,
    Settings,
    parse_args,
    parse_run,
    resolve_settings,
    strategy_specs,
)
from finetune.data import DecodedImages, ImageSplits, INaturalist12K, default_cache_root
from finetune.data.sample import SAMPLE_ROOT, resolve_named_data, sample_dataset
from finetune.errors import FinetuneError, redact
from finetune.model.zoo import build_backbone, seeded
from finetune.runtime import distributed
from finetune.runtime.memory import PeakMemory
from finetune.settings import print_config
from finetune.stats.analysis import ErrorAnalysis
from finetune.stats.metrics import EvaluationReport
from finetune.train.state import History
from finetune.tuning.advisor import Advice, Advisor
from finetune.tuning.search import (
    ConfigChange,
    LrSearch,
    Selection,
    Tuning,
    lr_space,
    same_config,
)

BackboneFactory = Callable[[str, int, bool], Backbone]
MAX_AUTO_SEEDS = 5
LOCK_FILE = ".compare.lock"  # held while a comparison writes its output folder
KEY_WIDTH = 20  # the settings printed at the start, right-aligned
WAIT_SECONDS = 5.0  # how often a --store worker with nothing to claim looks again


def make_backbone(name: str, num_classes: int, pretrained: bool) -> Backbone:
    """The default backbone factory (any name the CLI takes); `main(backbone_factory=...)`
    swaps it (tests: a tiny one)."""
    return build_backbone(name, num_classes, weights="DEFAULT" if pretrained else None)


INATURALIST = "inaturalist"
OTHER_DATA = (
    "Other data: --data inaturalist --preset reference (iNaturalist 12K, downloaded once into "
    "the cache folder, 3.6 GB) or --data /path/to/nature_12K.zip; your own photos: --data DIR "
    "with DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (or test/)."
)


def resolve_data(data: str | None) -> Path:
    """--data as given; none: the sample dataset shipped with the package (offline, minutes);
    "inaturalist": iNaturalist 12K in the cache folder, downloaded if missing."""
    if not data:
        return sample_dataset().resolve()
    if data != INATURALIST or Path(data).exists():
        return resolve_named_data(data).expanduser().resolve()
    root = default_cache_root() / "inaturalist"
    try:
        return INaturalist12K.download(root, progress=sys.stderr.isatty())
    except (FinetuneError, OSError) as error:
        raise SystemExit(
            f"iNaturalist 12K is not in {root} and could not be downloaded from "
            f"{INaturalist12K.URL} ({error}).\nPass the data instead: --data "
            "/path/to/nature_12K.zip (or its extracted folder), or any ImageFolder tree with "
            "train/ and val/ (or test/); with no --data the packaged sample runs offline."
        ) from None


def scan_data(settings: Settings, root: Path) -> ImageSplits:
    """One split for every strategy and seed (split seed 0); the test set is the tree's
    test/ or val/ folder, and val is carved out of train."""
    return ImageSplits.scan(root, split_seed=0, **settings.data_config().split_options(),
                            pre_resize=256 if settings.pre_resize else None,
                            progress=sys.stderr.isatty())


def loaders_for(splits: ImageSplits, settings: Settings, backbone: Backbone,
                decoded: DecodedImages | None = None) -> ImageFolderData:
    """Loaders over the shared split, decoding as this run's backbone expects; `decoded`
    keeps un-augmented images decoded for the runs after this one."""
    return ImageFolderData(splits, preprocessing=backbone.preprocessing,
                           keep_decoded=True if decoded is None else decoded,
                           **settings.data_config().loader_options())


# -- one run ------------------------------------------------------------------------------------
class TrainCacheWitness(Callback):
    """Why the first epoch's training pass ran the whole model (None: it trained on cached
    activations) — fit releases the cache when it returns, so it is asked during fit."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.reason, self._asked = loader, None, False

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self._asked:
            self.reason, self._asked = trainer.activations.why_uncached(self.loader), True


def run_one(spec: str, seed: int, *, settings: Settings, splits: ImageSplits,
            backbone_factory: BackboneFactory, output: Path,
            decoded: DecodedImages | None = None,
            extra_callbacks: Sequence[Callback] = ()) -> Row:
    """Train `spec` with `seed` on the shared split — at `settings.lr`, or (`tune="lr"`) at the
    lr `finetune.tuning.search.LrSearch` chooses on the validation split — and return its results
    row; the test set is evaluated once, for the trained row. Runs that pass one `decoded`
    store decode each un-augmented image once between them. The `advised` row trains the
    strategy `finetune.tuning.advisor` recommends on this run's train and val data."""
    pretrained = True if spec == ADVISED else parse_run(spec).pretrained  # advice: pretrained
    with seeded(seed):  # the new head (and from-scratch weights) depend on the seed alone
        initial = backbone_factory(settings.backbone, len(splits.classes), pretrained)
    data = loaders_for(splits, settings, initial, decoded)
    train_loader, val_loader = data.train_loader(shuffle_seed=seed), data.val_loader()
    advice = (advise_row(settings, seed, initial, train_loader, val_loader)
              if spec == ADVISED else None)
    run = parse_run(advice.recommendation.strategy if advice is not None else spec)

    def make_trainer(change: ConfigChange = same_config,
                     activations: ActivationCaches | None = None) -> Trainer:
        config = change(settings.train_config(seed, settings.lr))
        lr = config.lr
        witness = TrainCacheWitness(train_loader)
        callbacks: list[Callback] = [witness, *extra_callbacks]
        if sys.stderr.isatty() and settings.jobs == 1:  # runs side by side would garble bars
            callbacks.append(ProgressBar())
        if settings.loggers and distributed.is_main():  # each row under its own name
            name = folder_name(f"{spec}-seed{seed}-lr{lr:g}")
            callbacks += make_loggers(
                settings.loggers, output / "logs", name,
                settings={"compare": settings.to_dict(), "lr": lr},
                wandb_project=settings.wandb_project or "finetune-compare",
                wandb_group=settings.wandb_group)
        if settings.tune != "lr":  # a search compares full runs: no early stop in its race
            callbacks += early_stopping(config)
        # candidates of a search start from copies: each trains its own weights
        backbone = copy.deepcopy(initial) if settings.tune == "lr" else initial
        trainer = Trainer(backbone, copy.deepcopy(run.strategy), config, callbacks,
                          classes=data.classes, activations=activations)
        return trainer

    with PeakMemory(torch.device("cuda") if (settings.device != "cpu"
                                             and torch.cuda.is_available())
                    else torch.device("cpu")) as memory:
        # Same split for every run; the shuffle and augmentation follow the run's seed.
        tuning, range_test = None, None
        if settings.tune == "lr":
            search = LrSearch(settings.lr_grid, settings.epochs,
                              selection=Selection(settings.select))
            tuning, trainer = search.run(make_trainer, train_loader, val_loader)
        else:
            change = same_config
            if settings.tune == "lr-find":
                range_test = lr_find_row(make_trainer(), train_loader)
                change = lr_space((range_test["chosen"],)).apply(range_test["chosen"])
            trainer = make_trainer(change)
            trainer.fit(train_loader, val_loader)
        history = trainer.history
        test = trainer.evaluate(data.test_loader(), tta=settings.tta)
    strategy, backbone, freeze = trainer.strategy, trainer.backbone, trainer.state.freeze_report
    if strategy is None or freeze is None:
        raise RuntimeError("run_one's trainers are built with a strategy, which fit applies")
    witness = next(c for c in trainer.callbacks if isinstance(c, TrainCacheWitness))
    last = history.records[-1]
    costs = epoch_costs(history, tuning)
    return Row(**{
        "strategy": spec, "seed": seed, "strategy_state": strategy.state_dict(),
        "pretrained": run.pretrained, "backbone": backbone.name, "weights": backbone.weights,
        "trainable_params": freeze.trainable_params, "total_params": freeze.total_params,
        "trainable_pct": 100 * freeze.trainable_fraction,
        "val_accuracy": last["val_accuracy"], "best_val_accuracy": max(history["val_accuracy"]),
        "test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1,
        **noise.run_intervals(test.targets, test.predictions, len(data.classes)),
        "test_predictions": test.predictions.tolist(),
        "test_losses": None if test.losses is None else [round(float(v), 6) for v in test.losses],
        "test_confidences": (None if test.confidences is None
                             else [round(float(v), 6) for v in test.confidences]),
        "epochs": len(history), **costs,
        "peak_memory_mib": memory.mib, "memory_measure": memory.method,
        "precision": trainer.state.precision, "device": str(trainer.state.device),
        "world_size": distributed.world_size(),
        "jobs": settings.jobs,  # runs at once: how the CPU was shared
        "train_uncached_reason": witness.reason,
        "lr": trainer.config.lr,
        "tuning": tuning.to_dict() if tuning is not None else None,
        "lr_find": range_test,
        **advice_fields(advice),
        "train_images": len(data.train_samples), "val_images": len(data.val_samples),
        "test_images": len(data.test_samples),
        "per_class_test_accuracy": dict(zip(data.classes, map(float, test.per_class_accuracy),
                                            strict=True)),
        "history": history.records, "config": settings.to_dict(),
    })


def lr_find_row(trainer: Trainer, train_loader: Any) -> dict[str, Any]:
    """`--tune lr-find`: the range test's suggestion (and what it cost) for a row."""
    started = time.perf_counter()
    finding = trainer.lr_find(train_loader, steps=LR_FIND_STEPS)
    return {"chosen": finding.suggestion, "rule": finding.rule,
            "minimum_tenth": finding.minimum_tenth, "steepest": finding.steepest,
            "steps": len(finding.lrs), "ended": finding.ended,
            "seconds": time.perf_counter() - started}


def advise_row(settings: Settings, seed: int, initial: Backbone, train_loader: Any,
               val_loader: Any) -> Advice:
    """The advisor on this run's split, measuring the training the comparison runs."""
    config = settings.train_config(seed, settings.lr)
    grid = settings.lr_grid if settings.tune == "lr" else None  # as the rows' searches
    advice = Advisor(config, lr_grid=grid).run(copy.deepcopy(initial), train_loader,
                                               val_loader)
    distributed.say(f"advised (seed {seed}): {advice.recommendation.reason} "
                    f"[{advice.seconds:.0f} s]", flush=True)
    return advice


def advice_fields(advice: Advice | None) -> dict[str, Any]:
    """What the advised row records: the strategy chosen and why, and the advice's time,
    which its total cost includes."""
    if advice is None:
        return {}
    recommendation = advice.recommendation
    return {"advice": {"strategy": recommendation.strategy, "depth": recommendation.depth,
                       "lr": recommendation.lr, "reason": recommendation.reason,
                       "depths": [d.to_dict() for d in advice.depths]},
            "advise_seconds": advice.seconds}


def epoch_costs(history: History, tuning: Tuning | None) -> dict[str, float]:
    """Seconds per epoch (all, and the training pass) and training images per second. A tuned
    row's candidates share one activation-cache fill, paid by whichever ran first: the row is
    charged the whole fill in place of its own share, so it costs what a run of its own does."""
    fill = (tuning.fill_seconds - sum(r.get("cache_fill_seconds", 0.0) for r in history.records)
            if tuning is not None else 0.0)
    epochs = len(history)
    train_seconds = sum(history["train_seconds"]) + fill
    return {"seconds_per_epoch": (sum(history["epoch_seconds"]) + fill) / epochs,
            "train_seconds_per_epoch": train_seconds / epochs,
            "images_per_second": sum(history["train_images"]) / max(train_seconds, 1e-9)}


# -- seeds by cost -------------------------------------------------------------------------------
def auto_seeds(rows: Sequence[Row], strategies: Sequence[str]) -> dict[str, int]:
    """`--seeds auto`: each strategy as many seeds as fit in the time one run of the slowest
    strategy takes (at least 1, at most MAX_AUTO_SEEDS), from the seed-0 runs' epoch times —
    so extra seeds go where runs are cheap (a frozen backbone, the activation cache)."""
    cost = _first_run_seconds(rows, strategies)
    if not cost:
        return {}
    slowest = max(cost.values())
    return {name: max(1, min(MAX_AUTO_SEEDS, int(slowest / max(seconds, 1e-9))))
            for name, seconds in cost.items()}


def _first_run_seconds(rows: Sequence[Row],
                       strategies: Sequence[str]) -> dict[str, float]:
    """What seed 0 of each strategy cost (`row_seconds`)."""
    return {r["strategy"]: row_seconds(r)
            for r in rows if r["seed"] == 0 and r["strategy"] in strategies}


def row_seconds(row: Row) -> float:
    """What a row cost to train: its lr search where tuned (which includes the chosen run),
    else its epochs; plus the range test that set its lr and the advice that chose its
    strategy, where it had them."""
    seconds = (row["tuning"]["seconds"] if row.get("tuning")
               else row["seconds_per_epoch"] * row["epochs"])
    return (seconds + (row.get("advise_seconds") or 0.0)
            + (row.get("lr_find") or {}).get("seconds", 0.0))


def describe_auto_seeds(plan: dict[str, int], rows: Sequence[Row]) -> str:
    cost = _first_run_seconds(rows, list(plan))
    slowest = max(plan, key=lambda name: cost[name])
    counts = ", ".join(f"{name} {count}" for name, count in plan.items())
    return (f"--seeds auto: each strategy gets as many seeds as fit in one run of the slowest "
            f"({slowest}, {cost[slowest]:.0f} s), at most {MAX_AUTO_SEEDS}: {counts}")


def run_all(runs: Sequence[tuple[str, int]], rows: list[Row],
            failed: list[Row], settings: Settings, splits: ImageSplits,
            targets: list[int], backbone_factory: BackboneFactory, output: Path,
            decoded: DecodedImages | None = None, claims: store.Claims | None = None
            ) -> int | None:
    """Run each (strategy, seed) not yet in `rows` — `settings.jobs` at a time — rewriting the
    outputs after each; a run that raises goes to `failed`. With `claims` (`--store`) a run
    is trained only where this worker claims it. Returns 130 on Ctrl-C (outputs written),
    else None."""
    done = {(r["strategy"], r["seed"]) for r in rows}
    if claims is not None and not claims.retry_failed:
        done |= {(f["strategy"], f["seed"]) for f in failed}
    todo = []
    for index, (spec, seed) in enumerate(runs, start=1):
        if (spec, seed) in done:
            where = "the store" if claims is not None else output / "results.json"
            print(f"[{index}/{len(runs)}] {spec} seed {seed}: already in {where}, skipped")
        else:
            todo.append((index, spec, seed))
    shared = {"settings": settings, "splits": splits, "backbone_factory": backbone_factory,
              "output": output}
    run = run_one if claims is None else claims.runner(run_one)
    finished = (pool.outcomes(todo, settings.jobs, run, shared) if settings.jobs > 1
                else _one_at_a_time(todo, run, {**shared, "decoded": decoded}))
    try:
        for (index, spec, seed), outcome in finished:
            tag = f"[{index}/{len(runs)}] {spec} seed {seed}"
            if isinstance(outcome, store.StoreError):
                raise outcome  # no run can be kept: every worker stops at once
            if outcome == store.TAKEN:
                print(f"{tag}: another worker has it (--store)", flush=True)
                continue
            _record(tag, spec, seed, outcome, rows, failed)
            write_outputs(output, settings, splits.classes, rows, failed, draw=False,
                          targets=targets)
    except KeyboardInterrupt:
        write_outputs(output, settings, splits.classes, rows, failed, targets=targets)
        print(f"interrupted; {len(rows)} finished runs kept in {output}. Continue with the "
              "same command plus --resume.", file=sys.stderr)
        return 130
    return None


def split_digest(splits: ImageSplits) -> str:
    """Which images are train, val and test (class folder, file name, label), not where the
    tree lies: workers on other machines may mount the data elsewhere."""
    digest = hashlib.sha1()
    for part in (splits.train, splits.val, splits.test):
        for path, label in part:
            digest.update(f"{Path(path).parent.name}/{Path(path).stem}|{label}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()


def store_changes(settings: Settings, splits: ImageSplits, held: dict[str, Any]) -> list[str]:
    """How this worker's comparison differs from the one a store holds: the settings rows
    depend on (the data's path aside) and the split itself."""
    changed = [c for c in settings.changed_from(held) if not c.startswith("data:")]
    if held.get("split") != split_digest(splits):
        changed.append("split: other train/val/test images")
    return changed


def run_shared(runs: Sequence[tuple[str, int]], rows: list[Row],
               failed: list[Row], *args: Any, claims: store.Claims) -> int | None:
    """`run_all` as one of the workers of `--store`: run what this worker claims, then wait
    for the runs others hold, running any whose claim lapses; `rows` and `failed` end as the
    store's, every worker's runs together. `--resume` retries failed runs once, here."""
    said = False
    while True:
        status = run_all(runs, rows, failed, *args, claims=claims)
        claims.retry_failed = False
        rows[:], failed[:] = claims.rows(), claims.failures()
        if status is not None:
            return status
        waiting, lapse = claims.open_runs(list(runs))
        if not waiting:
            return None
        if not said:
            print(f"waiting for {len(waiting)} run(s) other workers hold; one whose worker "
                  f"stops renewing its claim runs here after {store.LEASE_SECONDS:.0f} s",
                  flush=True)
            said = True
        time.sleep(min(max(lapse - time.time(), 1.0), WAIT_SECONDS))


def _one_at_a_time(todo: Sequence[tuple[int, str, int]], run: Callable[..., Any],
                   shared: dict[str, Any]
                   ) -> Iterator[tuple[tuple[int, str, int], pool.Outcome]]:
    for index, spec, seed in todo:
        try:
            yield (index, spec, seed), run(spec, seed, **shared)
        except Exception as error:
            yield (index, spec, seed), error


def _record(tag: str, spec: str, seed: int, outcome: pool.Outcome, rows: list[Row],
            failed: list[Row]) -> None:
    """Keep a finished run's row and print its line, or note its failure."""
    if isinstance(outcome, Exception):
        print(redact("".join(traceback.format_exception(outcome))), file=sys.stderr, end="")
        failed.append(Row.failure(spec, seed, redact(repr(outcome))))
        print(redact(f"{tag}: FAILED ({outcome}); continuing with the others"), file=sys.stderr)
        return
    row = outcome
    rows.append(row)
    low, high = row["test_accuracy_ci95"]
    print(f"{tag}: val {100 * row['val_accuracy']:.1f}% · test "
          f"{100 * row['test_accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] · "
          f"{row['seconds_per_epoch']:.1f} s/epoch · "
          f"{row['images_per_second']:.1f} img/s · peak +{row['peak_memory_mib']:.0f} MiB · "
          f"{row['trainable_params']:,} trainable ({row['trainable_pct']:.1f}%) · "
          f"{row['precision']}", flush=True)


def folder_name(label: str) -> str:
    """A row's label as a folder name (a strategy spec holds ':' and may hold '/')."""
    return label.replace(":", "_").replace("/", "_")


def write_row_analyses(folder: Path, rows: Sequence[Row], splits: ImageSplits) -> None:
    """Each row's error analysis (`finetune.stats.analysis`) in `folder/<strategy>-seed<N>/`:
    its test images by loss, the worst in a grid, its confusion picture and confused pairs.
    Rows resumed from results written before per-image losses were kept are left out."""
    targets = [label for _, label in splits.test]
    paths = [str(path) for path, _ in splits.test]
    for row in rows:
        if row.test_losses is None or row.test_predictions is None:
            continue
        report = EvaluationReport.from_predictions(targets, row.test_predictions,
                                                   splits.classes, losses=row.test_losses,
                                                   confidences=row.test_confidences)
        name = folder_name(f"{row.strategy}-seed{row.seed}")
        ErrorAnalysis(report, paths).write(folder / name, worst=8)


def write_outputs(*args: Any, **kwargs: Any) -> str:
    """`report.write_outputs` on rank 0; the other processes of a data-parallel comparison
    write nothing."""
    return _write_outputs(*args, **kwargs) if distributed.is_main() else ""


# -- main ---------------------------------------------------------------------------------------
def launch(argv: Sequence[str] | None, nproc: int) -> int:
    """`--nproc N`: the same command under torchrun, N processes on this machine."""
    rest, skip = [], False
    for item in sys.argv[1:] if argv is None else argv:
        if skip or item == "--nproc" or item.startswith("--nproc="):
            skip = item == "--nproc"
            continue
        rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "finetune", "compare", *rest]
    print("running: " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def main(argv: Sequence[str] | None = None,
         backbone_factory: BackboneFactory = make_backbone, prog: str = PROG) -> int:
    """Run every strategy × seed; returns 0, 1 if a run failed, 130 on Ctrl-C. Under
    torchrun every process trains each run; rank 0 alone prints and writes. `prog` is how
    the usage and errors name the command (`python -m benchmarks.compare` in a checkout)."""
    tolerate_unencodable_output()
    args = parse_args(argv, prog=prog)
    if args.print_config:
        print_config(args.parser, args)
        return 0
    specs = strategy_specs(args)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return launch(argv, args.nproc)
    with distributed.joined(args.device):
        if not distributed.is_main():
            with contextlib.redirect_stdout(io.StringIO()):
                return _compare(args, specs, Path(args.output), argv, backbone_factory)
        return _locked(args, specs, argv, backbone_factory)


def _locked(args: argparse.Namespace, specs: list[str], argv: Sequence[str] | None,
            backbone_factory: BackboneFactory) -> int:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    busy = (f"another finetune compare is writing to {output}; wait for it to finish or "
            "choose another --output")
    try:
        with exclusive_lock(output / LOCK_FILE, wait=False, busy=busy):
            return _compare(args, specs, output, argv, backbone_factory)
    except (LockBusyError, store.StoreError) as error:
        raise SystemExit(str(error)) from None


def _compare(args: argparse.Namespace, specs: list[str], output: Path,
             argv: Sequence[str] | None, backbone_factory: BackboneFactory) -> int:
    """main's work, while it holds the output folder's lock."""
    previous = output / "results.json"
    if previous.is_file() and not (args.resume or args.overwrite):
        raise SystemExit(
            f"{output} holds the results of an earlier comparison; continue it with --resume, "
            "replace them with --overwrite, or choose another --output.")
    # one spelling, whichever entry ran it: the same arguments give the same results.json
    command = f"{PROG} " + " ".join(sys.argv[1:] if argv is None else argv)
    to_wandb = args.wandb or "wandb" in args.logger
    group = f"compare-{time.strftime('%Y%m%d-%H%M%S')}" if to_wandb else None
    settings = resolve_settings(args, specs, str(resolve_data(args.data)), command, group)
    rows = load_previous(output, settings) if args.resume and not args.store else []
    for key, value in settings.to_dict().items():
        print(f"{key:>{KEY_WIDTH}}: {value}")
    splits = scan_data(settings, Path(settings.data))
    print(f"{'split':>{KEY_WIDTH}}: {len(splits.classes)} classes · {len(splits.train)} train · "
          f"{len(splits.val)} val · {len(splits.test)} test images")
    claims = None
    if args.store:
        claims = store.Claims(store.store_path(args.store), retry_failed=args.resume)
        claims.adopt({**settings.to_dict(), "split": split_digest(splits)},
                     lambda held: store_changes(settings, splits, held))
        rows = claims.rows()
        print(f"{'store':>{KEY_WIDTH}}: {claims.path} ({len(rows)} run(s) done by the workers "
              f"sharing it); this worker is {claims.worker}")
    on_sample = Path(settings.data) == SAMPLE_ROOT.resolve()
    if on_sample:
        print(f"{'':>{KEY_WIDTH}}  the packaged sample (UC Merced Land Use, public domain). "
              f"{OTHER_DATA}")
    targets = [label for _, label in splits.test]
    failed: list[Row] = claims.failures() if claims is not None else []
    runs = [(s, seed) for s in settings.strategies for seed in settings.seeds]
    decoded = DecodedImages()  # every run reads the same split: decode it once

    def run_these(batch: Sequence[tuple[str, int]]) -> int | None:
        context = (rows, failed, settings, splits, targets, backbone_factory, output, decoded)
        if claims is not None:
            return run_shared(batch, *context, claims=claims)
        return run_all(batch, *context)

    status = run_these(runs)
    if status is None and settings.seeds_auto:
        # rank 0's timings decide for every process of a data-parallel comparison
        plan = distributed.same_as_main(auto_seeds(rows, settings.strategies))
        if plan:
            print(describe_auto_seeds(plan, rows), flush=True)
        extra = [(s, seed) for s in settings.strategies for seed in range(1, plan.get(s, 1))]
        status = run_these(extra)
    if status is not None:
        return status
    if claims is not None:  # in the order of the command, whichever worker finished first
        order = {spec: index for index, spec in enumerate(settings.strategies)}
        rows.sort(key=lambda row: (order.get(row["strategy"], len(order)), row["seed"]))
    measured = []
    if settings.hindsight:
        measured = run_hindsight(settings, rows, lambda spec, seed, fixed: run_one(
            spec, seed, settings=fixed, splits=splits, backbone_factory=backbone_factory,
            output=output, decoded=decoded))
    print("\n" + write_outputs(output, settings, splits.classes, rows, failed, targets=targets,
                               hindsight=measured))
    if distributed.is_main():
        write_row_analyses(output / "analysis", rows, splits)
    pictures = ", *.png" if plots.available() else ""
    print(f"\nresults in {output}/ (results.json, results.csv, results.md, pairwise.*, "
          f"per_class.*{pictures})")
    if on_sample:
        print(f"That was the packaged sample: {len(splits.test)} test images, so one "
              f"image moves accuracy by {100 / len(splits.test):.2g} points. {OTHER_DATA}")
    if failed:
        print(f"{len(failed)} run(s) failed: {[f['strategy'] for f in failed]}", file=sys.stderr)
    return 1 if failed else 0

