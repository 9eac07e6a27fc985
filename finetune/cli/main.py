"""`finetune train | evaluate | advise | predict | export | strategies` (also `python -m
finetune …`).

Each command is a thin layer over the object API: `build_backbone`, `build_strategy`,
`ImageFolderData`, `Trainer` with the `Checkpoint`, `WandbLogger` and progress callbacks.
Bad arguments and library errors (`FinetuneError`) end as argparse-style messages with exit
code 2, never a traceback (`--traceback` shows one).

`train --checkpoint-dir DIR` writes `best.pt` / `last.pt` and `run.json`: how the backbone and
data were set up (backbone spec, weights, preprocessing at the trained image size, split).
`evaluate` needs it because a checkpoint records the architecture's name and classes but not
the preprocessing the model was trained with.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from finetune.cache.plan import ActivationCaches
from finetune.callbacks import Callback, Checkpoint, make_loggers
from finetune.callbacks.console import (
    FreezeReportLines,
    progress_callback,
    tolerate_unencodable_output,
)
from finetune.callbacks.early_stopping import early_stopping
from finetune.callbacks.loggers import logger_names
from finetune.callbacks.run_file import (
    RUN_FILE,
    RUN_FORMAT,
    RunFile,
    checkpoint_in,
    read_run_file,
)
from finetune.cli.advise import run_advise
from finetune.cli.deploy import run_export, run_predict
from finetune.cli.evaluate import run_evaluate
from finetune.cli.options import (
    add_setting_flags,
    backbone_name,
    data_config,
    lr_argument,
    lr_grid_argument,
    range_test_steps,
    recorded_flag,
    resumed_settings,
    strategy_argument,
    train_config,
)
from finetune.data import DATA_ENV, ImageFolderData, ImageSplits, resolve_data_root
from finetune.deploy.export import EXPORT_FORMATS
from finetune.deploy.inference import recorded_backbone
from finetune.deploy.model_card import write_model_card
from finetune.errors import FinetuneError, redact
from finetune.model.backbone import Backbone
from finetune.model.zoo import build_backbone
from finetune.runtime import distributed
from finetune.runtime.precision import machine
from finetune.settings import (
    NOT_SETTINGS,
    add_config_flags,
    argument_type,
    non_negative_float,
    plain,
    positive_float,
    positive_int,
    print_config,
    use_config_file,
)
from finetune.strategies import PRESETS, STRATEGIES, FreezeStrategy
from finetune.train.config import TrainConfig, device_argument
from finetune.train.trainer import TTA_MODES, Trainer
from finetune.tuning.search import (
    SELECTIONS,
    ConfigChange,
    LrSearch,
    Selection,
    Tuning,
    lr_grid,
    search_grid,
)

AUTO_LR_CENTER = 1e-3  # --lr auto's grid: 3.2e-4, 1e-3, 3.2e-3 and beyond a winning edge
ADVISE_LR = 1e-3  # the lr each of advise's fine-tunes tries first


# -- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune pretrained image classifiers with interchangeable freezing "
                    "strategies.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error instead of a one-line message")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="fine-tune a backbone under a freezing strategy",
        description="Fine-tune a backbone under a freezing strategy, then report per-class "
                    "accuracy on the test set.",
        epilog="examples:\n  finetune train --data nature_12K.zip --strategy freeze-fraction:"
               "fraction=0.8 --epochs 5\n  finetune train --data hymenoptera --backbone lite0 "
               "--strategy last-layer --checkpoint-dir runs/a",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(train)
    add_setting_flags(train, "train", parsers={"lr": lr_argument}, notes={"lr": (
        ", or auto: chosen on the validation split from --lr-grid, then trained as a normal "
        "run")})
    train.add_argument("--lr-grid", type=lr_grid_argument, default=None, metavar="LRS",
                       help="the lrs --lr auto tries, comma-separated (default: "
                            f"{','.join(f'{v:g}' for v in lr_grid(AUTO_LR_CENTER))}; it grows "
                            "past an edge that wins)")
    train.add_argument("--select", choices=SELECTIONS, default=None,
                       help="how --lr auto compares candidates on the validation split: loss "
                            "(cross-entropy), accuracy, or accuracy+loss (default: loss)")
    train.add_argument("--wandb-project", default=None,
                       help="log to this Weights & Biases project (offline without an API key)")
    train.add_argument("--wandb-name", default=None, help="the wandb run's name")
    train.add_argument("--logger", type=argument_type(logger_names), default=(),
                       metavar="wandb,tensorboard,csv",
                       help="log every epoch's metrics to any of these, comma-separated: wandb "
                            "(offline without an API key), tensorboard (the [tensorboard] "
                            "extra), csv (metrics.csv); the same metrics in each (default: none, "
                            "or wandb with --wandb-project)")
    train.add_argument("--log-dir", type=Path, default=None,
                       help="where tensorboard and csv write, in a folder named after the run "
                            "(default: the checkpoint folder, else logs)")
    train.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="write best.pt, last.pt and run.json here (default: the --resume "
                            "checkpoint's folder, else none)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --checkpoint-dir (refused otherwise)")
    train.add_argument("--resume", type=Path, default=None,
                       help="continue from this checkpoint or run folder; flags left out take "
                            "the run's own settings from its run.json")
    add_config_flags(train)
    train.set_defaults(handler=run_train, parser=train)

    evaluate = commands.add_parser(
        "evaluate", help="per-class report of a checkpoint on the test set",
        description="Rebuild the model a `finetune train` checkpoint holds and print its "
                    "per-class accuracy, precision, recall and F1.",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True,
                          help="a .pt file, or a checkpoint folder (best.pt, else last.pt)")
    _add_data_argument(evaluate, required_hint=" (default: the data recorded at training)")
    add_setting_flags(evaluate, "evaluate")
    evaluate.add_argument("--backbone", type=backbone_name, default=None, metavar="NAME",
                          help="rebuild this backbone instead of the one recorded; required "
                               "when run.json names a package.module:function factory, which "
                               "is never imported from the file")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="the test folder, or the training run's validation split "
                               "(default: test)")
    evaluate.add_argument("--json", type=Path, default=None,
                          help="also write the report as JSON to this file")
    evaluate.add_argument("--analysis", type=Path, default=None, metavar="DIR",
                          help="write the error analysis here: top_losses.csv (every image, "
                               "highest loss first), top_losses.png, confusion.png, "
                               "confused.txt (default: analysis-<split> beside the checkpoint)")
    evaluate.add_argument("--no-analysis", action="store_true",
                          help="print the per-class report only")
    evaluate.add_argument("--worst", type=positive_int, default=16, metavar="N",
                          help="images in top_losses.png (default: 16)")
    evaluate.add_argument("--explain", action="store_true",
                          help="also explained.png: what the model looked at in those images "
                               "(Grad-CAM of the predicted class; the [explain] extra)")
    evaluate.add_argument("--tta", choices=TTA_MODES, default="none",
                          help="flip: average each image's probabilities with its mirror "
                               "image's (default: none)")
    evaluate.set_defaults(handler=run_evaluate, parser=evaluate)

    advise = commands.add_parser(
        "advise", help="which layers to freeze, and what each choice costs",
        description="Measure every depth to freeze through — a linear probe on its frozen "
                    "features, the cost of an epoch, short fine-tunes from the promising "
                    "depths — from one pass over train and val, and recommend one "
                    "(docs/advise.md). The test set is not read.",
        epilog="example:\n  finetune advise --data sample --image-size 160 --batch-size 16 "
               "--epochs 3 --train-per-class 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_argument(advise)
    advise.add_argument("--backbone", type=backbone_name, default="auto", metavar="NAME",
                        help="as for train (default: auto)")
    # the first lr each fine-tune races: 1e-3, where the advisor measured fine-tunes to start
    add_setting_flags(advise, "advise", defaults={"lr": ADVISE_LR}, notes={
        "epochs": ": the training the advice is for; its command trains this many epochs, "
                  "and fine-tunes are this long unless --finetune-epochs",
        "lr": ": the lr each fine-tune tries first"})
    advise.add_argument("--finetune-epochs", type=positive_int, default=None,
                        help="length of each short fine-tune (default: --epochs)")
    advise.add_argument("--budget", type=non_negative_float, default=None, metavar="SECONDS",
                        help="time for the fine-tunes besides the head alone's (default: one "
                             "epoch of full fine-tuning, as measured)")
    advise.add_argument("--lr-grid", type=lr_grid_argument, default=None, metavar="LRS",
                        help="the other lrs each fine-tune races (default: --lr and its "
                             "neighbours, two per decade; the grid grows past an edge that "
                             "wins)")
    advise.add_argument("--output", type=Path, default=Path("advice"),
                        help="folder for advise.json, advise.md and frontier.png "
                             "(default: advice)")
    advise.add_argument("--overwrite", action="store_true",
                        help="replace earlier advice in --output")
    add_config_flags(advise)
    advise.set_defaults(handler=run_advise, parser=advise)

    predict = commands.add_parser(
        "predict", help="classify image files with a trained run",
        description="Classify files, folders (recursively) or glob patterns with a trained "
                    "run (its folder, a checkpoint, or a .safetensors export) and write the "
                    "top-k classes as CSV: path, rank, class, probability, error.",
        epilog="example:\n  finetune predict runs/ff80 photos/ 'more/*.jpg' --top-k 3 "
               "--output predictions.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("model", type=Path, metavar="RUN_DIR|CHECKPOINT|EXPORT")
    predict.add_argument("paths", nargs="+", metavar="PATH",
                         help="image files, folders or glob patterns")
    predict.add_argument("--top-k", type=positive_int, default=5, help="(default: 5)")
    predict.add_argument("--output", type=Path, default=None,
                         help="CSV file to write (default: standard output)")
    predict.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    predict.add_argument("--workers", type=positive_int, default=None,
                         help="decoding threads (default: one per core, at most 8)")
    predict.add_argument("--tta", choices=TTA_MODES, default="none",
                         help="flip: average with the mirrored image (default: none)")
    predict.add_argument("--device", type=device_argument, default="auto",
                         help="auto, cpu, cuda or cuda:N (default: auto)")
    predict.add_argument("--backbone", type=backbone_name, default=None, metavar="NAME",
                         help="a package.module:function you trust, for runs whose backbone "
                              "came from your code (never imported from a file)")
    predict.set_defaults(handler=run_predict, parser=predict)

    export = commands.add_parser(
        "export", help="write a trained run as ONNX, TorchScript or safetensors, verified",
        description="Export the whole classifier with its classes and preprocessing, load it "
                    "back as a user would and compare its logits with PyTorch's on real "
                    "images (max |difference| <= 1e-4), or fail and write nothing.",
        epilog="example:\n  finetune export runs/ff80 --format onnx --output model.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("model", type=Path, metavar="RUN_DIR|CHECKPOINT")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--output", type=Path, required=True, help="the file to write")
    export.add_argument("--check", nargs="+", default=None, metavar="IMAGES",
                        help="images to verify on (default: a few of the run's test images, "
                             "when its data folder is here)")
    export.add_argument("--backbone", type=backbone_name, default=None, metavar="NAME",
                        help="as for predict")
    export.set_defaults(handler=run_export, parser=export)

    compare = commands.add_parser(
        "compare", add_help=False, help="train several strategies on one split, side by side: "
        "accuracy, per-class accuracy, cost, a verdict (`finetune compare --help`)")
    compare.add_argument("arguments", nargs=argparse.REMAINDER,
                         help="finetune compare's own flags (`finetune compare --help`)")
    compare.set_defaults(handler=run_compare)

    lr_find = commands.add_parser(
        "lr-find", help="the learning-rate range test: loss against an exponential lr ramp",
        description="Train the strategy at an lr growing exponentially from --start to --end "
                    "(one value per optimizer step) and suggest an lr: the smoothed loss's "
                    "minimum divided by 10 (docs/recipes.md). The weights are not saved.",
        epilog="example:\n  finetune lr-find --data sample --strategy last-layer --image-size "
               "160 --batch-size 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(lr_find)
    add_setting_flags(lr_find, "lr-find")
    lr_find.add_argument("--start", type=positive_float, default=1e-7, help="(default: 1e-7)")
    lr_find.add_argument("--end", type=positive_float, default=1.0, help="(default: 1)")
    lr_find.add_argument("--steps", type=range_test_steps, default=100,
                         help="optimizer steps of the ramp (default: 100)")
    lr_find.add_argument("--output", type=Path, default=Path("lr_find"),
                         help="folder for lr_find.json and lr_find.png (default: lr_find)")
    lr_find.add_argument("--overwrite", action="store_true",
                         help="replace an earlier range test in --output")
    add_config_flags(lr_find)
    lr_find.set_defaults(handler=run_lr_find, parser=lr_find, epochs=1)

    strategies = commands.add_parser("strategies", help="list the registered strategies",
                                     description="The strategies --strategy accepts.")
    strategies.set_defaults(handler=run_strategies, parser=strategies)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, --strategy, --backbone and --weights (train and lr-find)."""
    _add_data_argument(parser)
    parser.add_argument("--strategy", type=strategy_argument, default="freeze-fraction",
                        metavar="NAME[:OPTIONS]",
                        help="registered name, optionally with options: NAME[:key=value,...] "
                             "(lists joined with '+'), e.g. freeze-fraction:fraction=0.5,"
                             "count=numel; `finetune strategies` lists them "
                             "(default: freeze-fraction, the reference's 80%%)")
    parser.add_argument("--backbone", type=backbone_name, default="auto", metavar="NAME",
                        help="auto (resnet50 if its weights are cached, else lite0), lite0, a "
                             "torchvision name (resnet50, convnext_tiny, ...), timm/<model>, "
                             "or package.module:function returning a Backbone (default: auto)")
    parser.add_argument("--weights", default="DEFAULT",
                        help="DEFAULT (ImageNet), none (random init), a weights enum name "
                             "(IMAGENET1K_V1) or a .pth state dict path (default: DEFAULT)")


def _add_data_argument(parser: argparse.ArgumentParser, required_hint: str = "") -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder tree (train/, val/ or test/), the iNaturalist 12K "
                             "folder or its zip, or 'sample' (the small dataset shipped with "
                             f"finetune) (default: ${DATA_ENV}){required_hint}")


# -- commands ---------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    """Under torchrun every process runs this; rank 0 alone prints and writes files."""
    with distributed.joined(args.device):
        return _train(args, distributed.say)


def take_run_settings(args: argparse.Namespace) -> None:
    """A resume continues the run as it was set up: every flag left at its default takes the
    run's own value from its run.json (backbone, strategy, data, split, seed, image size, and
    every setting declared to be kept on resume), so `finetune train --resume runs/x --epochs
    10` needs nothing else. A backbone recorded as an import path is code and is never
    imported unless typed on the command line."""
    args.resume = checkpoint_in(args.resume, ("last.pt", "best.pt"))
    record = read_run_file(args.resume)
    if record is None:
        return
    source = args.resume.parent / RUN_FILE
    parser: argparse.ArgumentParser = args.parser
    if args.backbone == parser.get_default("backbone"):
        args.backbone = recorded_backbone(record["backbone"], source, None)
    if args.strategy == strategy_argument(parser.get_default("strategy")):
        args.strategy = FreezeStrategy.from_state_dict(record["strategy"])
    if args.data is None:
        args.data = Path(record["data"])
    if args.weights == parser.get_default("weights") and "weights" in record.get("cli", {}):
        args.weights = record["cli"]["weights"]
    resumed_settings(args, record, source)
    if args.lr == parser.get_default("lr"):  # the run's lr, or the one --lr auto chose
        tuning, run_lr = record.get("tuning"), record.get("cli", {}).get("lr")
        if isinstance(tuning, dict):
            args.lr = float(tuning["chosen"])
        elif run_lr not in (None, "auto"):
            args.lr = recorded_flag(parser, "lr", run_lr, source)
    if isinstance(record.get("tuning"), dict):  # the resumed run.json keeps how lr was chosen
        args.tuned = record["tuning"]


def _train(args: argparse.Namespace, say: Callable[..., None]) -> int:
    if args.lr == "auto" and args.resume is not None:
        args.parser.error("--lr auto chooses the lr before a run starts; a resume goes on at "
                          "the lr its run chose (leave --lr out)")
    if args.select is not None and args.lr != "auto":
        args.parser.error("--select is how --lr auto chooses the lr; add --lr auto (or drop "
                          "--select)")
    if args.patience is not None and not args.val_split:
        args.parser.error("--patience stops on the validation split's --monitor: give "
                          "--val-split above 0 (e.g. 0.2)")
    if args.lr == "auto" and not args.val_split:
        args.parser.error("--lr auto chooses the lr on the validation split: give --val-split "
                          "above 0 (e.g. 0.2), or a number: --lr 1e-4")
    if args.resume is not None:
        take_run_settings(args)
    data, backbone = _data_and_backbone(args, say)
    strategy: FreezeStrategy = args.strategy
    val_loader = data.val_loader() if args.val_split > 0 else None
    config = train_config(args, lr=AUTO_LR_CENTER if args.lr == "auto" else args.lr)
    checkpoint_dir = args.checkpoint_dir or (args.resume.parent if args.resume else None)
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(checkpoint_dir, save_best=args.val_split > 0,
                                overwrite=args.overwrite)
    tuning = None
    if args.lr == "auto":
        if checkpoint is not None:  # refused now, not after the search
            checkpoint.check_folder()
        tuning = _choose_lr(args, backbone, strategy, config, data, val_loader, say)
        config = attrs.evolve(config, lr=tuning.chosen)
    callbacks: list[Callback] = [FreezeReportLines(), progress_callback()]
    if checkpoint is not None:
        # Checkpoint first: it refuses a folder holding another run before run.json is written.
        record = _run_record(args, backbone, data, strategy)
        if tuning is not None:
            record["tuning"] = tuning.to_dict()
        elif getattr(args, "tuned", None) is not None:
            record["tuning"] = args.tuned
        callbacks += [checkpoint, RunFile(checkpoint.dirpath, record)]
    callbacks += early_stopping(config) + _loggers(args, checkpoint_dir)
    trainer = Trainer(backbone, strategy, config, callbacks, classes=data.classes)
    trainer.fit(data.train_loader(), val_loader, resume=args.resume)
    if checkpoint is not None:
        saved = [p for p in (checkpoint.best_path, checkpoint.last_path) if p.is_file()]
        say("checkpoints: " + ", ".join(map(str, saved)))
    report = trainer.evaluate(data.test_loader())
    say(f"test set (weights after the last epoch):\n{report.table()}")
    if checkpoint is not None and distributed.is_main():
        card = write_model_card(
            checkpoint.dirpath, record=record, report=report, history=trainer.history,
            freeze=trainer.state.freeze_report, counts=split_counts(data),
            precision=trainer.state.precision, device=str(trainer.state.device),
            cpu=machine()["cpu"])
        say(f"model card: {card}")
    return 0


def _loggers(args: argparse.Namespace, checkpoint_dir: Path | None) -> list[Callback]:
    """`--logger` (and `--wandb-project`, which asks for wandb): each under the run's name."""
    names = list(args.logger)
    if args.wandb_project and "wandb" not in names:
        names.append("wandb")
    if not names or not distributed.is_main():
        return []
    folder = args.log_dir or (checkpoint_dir.parent if checkpoint_dir else Path("logs"))
    name = checkpoint_dir.name if checkpoint_dir else (args.wandb_name or "run")
    return make_loggers(names, folder, name, settings={"cli": _cli_config(args)},
                        wandb_project=args.wandb_project or "finetune",
                        wandb_name=args.wandb_name)


def _data_and_backbone(args: argparse.Namespace, say: Callable[..., None]
                       ) -> tuple[ImageFolderData, Backbone]:
    """The tree first (the head's size), then the backbone, whose preprocessing the loaders
    use (train and lr-find)."""
    settings = data_config(args)  # checks that the image size fits before anything loads
    splits = ImageSplits.scan(resolve_data_root(args.data), split_seed=args.seed,
                              progress=False, **settings.split_options())
    backbone = build_backbone(args.backbone, len(splits.classes), args.weights, seed=args.seed)
    data = ImageFolderData(splits, seed=args.seed, preprocessing=backbone.preprocessing,
                           **settings.loader_options())
    say(f"data: {len(data.classes)} classes · train {len(data.train_samples)} · val "
        f"{len(data.val_samples)} · test {len(data.test_samples)} images ({data.root})")
    say(f"backbone: {backbone.name} · weights: {backbone.weights or 'random init'}")
    hint = imbalance_hint(data, args.balance)
    if hint:
        say(hint)
    return data, backbone


IMBALANCE_RATIO = 3  # largest / smallest training class from which train suggests --balance


def imbalance_hint(data: ImageFolderData, balance: str) -> str | None:
    """A line suggesting --balance loss for a training split whose largest class has
    IMBALANCE_RATIO times the images of its smallest (measured in docs/recipes.md)."""
    counts = train_class_counts(data)
    if balance != "none" or len(counts) < 2:
        return None
    largest, smallest = max(counts.values()), min(counts.values())
    if largest < IMBALANCE_RATIO * smallest:
        return None
    return (f"note: the classes are imbalanced ({largest} vs {smallest} training images); "
            "--balance loss weights the loss by class and scored 11-12 points higher on a "
            "long-tailed UC Merced (docs/recipes.md)")


def run_lr_find(args: argparse.Namespace) -> int:
    """`finetune lr-find`: the range test of `Trainer.lr_find` on the training split."""
    output: Path = args.output
    if (output / "lr_find.json").is_file() and not args.overwrite:
        args.parser.error(f"{output} holds an earlier range test (lr_find.json); choose "
                          "another --output or pass --overwrite")
    if distributed.world_size() > 1:
        args.parser.error("lr-find runs in one process; run it without torchrun")
    data, backbone = _data_and_backbone(args, print)
    trainer = Trainer(backbone, args.strategy, train_config(args, lr=args.start),
                      classes=data.classes)
    finding = trainer.lr_find(data.train_loader(), start=args.start, end=args.end,
                              steps=args.steps)
    written = finding.write(output)
    print(finding.summary())
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def train_class_counts(data: ImageFolderData) -> collections.Counter[int]:
    """Training images per class index (classes without images are absent)."""
    return collections.Counter(label for _, label in data.train_samples)


def split_counts(data: ImageFolderData) -> dict[str, int]:
    """Images per split, and in the smallest training class (for the model card)."""
    per_class = train_class_counts(data)
    return {"train": len(data.train_samples), "val": len(data.val_samples),
            "test": len(data.test_samples),
            "smallest_train_class": min(per_class.values()) if per_class else 0}


def _choose_lr(args: argparse.Namespace, backbone: Backbone, strategy: FreezeStrategy,
               config: TrainConfig, data: ImageFolderData, val_loader: Any,
               say: Callable[..., None]) -> Tuning:
    """`--lr auto`: the search of `finetune compare --tune lr`, on copies of the backbone
    and without the run's callbacks; the run itself then trains at the chosen lr."""
    grid = args.lr_grid or lr_grid(AUTO_LR_CENTER)
    center = min(grid, key=lambda lr: abs(math.log(lr / AUTO_LR_CENTER)))
    say(f"--lr auto: trying {', '.join(f'{lr:g}' for lr in grid)} on the validation split")

    def make_trainer(change: ConfigChange, activations: ActivationCaches) -> Trainer:
        return Trainer(copy.deepcopy(backbone), copy.deepcopy(strategy), change(config),
                       [progress_callback()],
                       classes=data.classes, activations=activations)

    search = LrSearch(search_grid(center, grid), args.epochs,
                      selection=Selection(args.select or "loss"))
    tuning, _ = search.run(make_trainer, data.train_loader(), val_loader)
    say(tuning.describe())
    return tuning


def _run_record(args: argparse.Namespace, backbone: Backbone, data: ImageFolderData,
                strategy: FreezeStrategy) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "backbone": args.backbone if args.backbone != "auto" else _auto_name(backbone),
        "backbone_name": backbone.name,
        "weights": args.weights,
        "num_classes": backbone.num_classes,
        "classes": list(data.classes),
        "preprocessing": attrs.asdict(data.preprocessing),
        "strategy": strategy.state_dict(),
        "data": str(Path(data.root).resolve()),
        "val_split": args.val_split,
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "world_size": distributed.world_size(),
        "nodes": distributed.nodes(),
        "cli": _cli_config(args),
    }


def _auto_name(backbone: Backbone) -> str:
    return "lite0" if backbone.name == "efficientnet_lite0" else backbone.name


def _cli_config(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings as run.json records them (and `--print-config` writes)."""
    return {key: plain(value, spelled) for key, value in vars(args).items()
            if key not in NOT_SETTINGS}


def spelled(value: Any) -> Any:
    """A strategy as the spec `--strategy` reads back; anything else as text."""
    return value.spec() if isinstance(value, FreezeStrategy) else str(value)


def _summary(cls: type, limit: int = 90) -> str:
    """The first sentence of a docstring (cut at a word near `limit` characters): one line
    per strategy, however long its docstring's opening sentence."""
    paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<!\bal)\.\s+(?=[A-Z`])", paragraph, maxsplit=1)[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return sentence


def run_strategies(args: argparse.Namespace) -> int:
    lines = [(name, cls.__name__, _summary(cls)) for name, cls in STRATEGIES.items()]
    lines += [(name, STRATEGIES[base].__name__, f"preset: {base} with " + ", ".join(
        f"{key}={value}" for key, value in options.items())) for name, (base, options)
        in PRESETS.items()]
    width = max(len(line[0]) for line in lines)
    class_width = max(len(line[1]) for line in lines)
    for name, class_name, summary in sorted(lines):
        print(f"{name:<{width}}  {class_name:<{class_width}}  {summary}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """`finetune compare ...`: the library's comparison (`finetune.compare`), with its own
    flags, outputs and exit codes."""
    from finetune.compare.run import main as compare

    return compare(args.arguments, prog="finetune compare")


def subcommand_parser(parser: argparse.ArgumentParser, name: str | None
                      ) -> argparse.ArgumentParser | None:
    """The parser of subcommand `name` (None for a name it does not know)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


# -- entry point --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; library errors exit with code 2 and a one-line message on stderr."""
    tolerate_unencodable_output()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((item for item in argv if not item.startswith("-")), None)
    if command == "compare":  # its own parser, --help included (argparse's REMAINDER drops it)
        return run_compare(argparse.Namespace(arguments=argv[argv.index("compare") + 1:]))
    parser = build_parser()
    subcommand = subcommand_parser(parser, command)
    if subcommand is not None:
        use_config_file(subcommand, argv)
    args = parser.parse_args(argv)
    if getattr(args, "print_config", False):
        print_config(args.parser, args, spelled)
        return 0
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `finetune strategies | head`: the reader left; say nothing more (Python's recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FinetuneError, ValueError, KeyError, TypeError, ImportError, OSError) as error:
        if args.traceback:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        # one line, no usage block: the arguments parsed; what failed is the run
        print(redact(f"finetune {args.command}: error: {message} ({type(error).__name__}; "
                     "--traceback for details)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
