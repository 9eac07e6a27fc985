"""What a comparison runs: presets, the resolved `Settings`, and each run's `RunSpec`.

Every choice ends up in `Settings` (printed at the start, stored in results.json); the fields
marked `resume` must match for `--resume` to reuse an earlier run's rows.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

import finetune
import finetune.compare.pool as pool
from finetune import FreezeStrategy
from finetune.callbacks.loggers import logger_names
from finetune.data.config import DataConfig, check_image_fits
from finetune.model.zoo import default_backbone_name
from finetune.settings import (
    add_config_flags,
    add_flags,
    argument_type,
    checked_number,
    declared,
    default_of,
    kept_on_resume,
    positive_int,
    recorded,
    use_config_file,
    values_of,
)
from finetune.train.config import TrainConfig, setting_classes
from finetune.train.trainer import TTA_MODES
from finetune.tuning.search import SELECTIONS, parse_grid, search_grid

DEFAULT_STRATEGIES = ("last-layer", "freeze-80", "full-unfreeze", "freeze-head-only",
                      "from-scratch")
TUNE_CHOICES = ("lr", "lr-find", "none")
LR_FIND_STEPS = 100  # the range test's ramp in `--tune lr-find`
# Every row needs a validation accuracy, so unlike `finetune train` 0 is not allowed.
OPEN_FRACTION = checked_number(float, lambda v: 0 < v < 1, "a number between 0 and 1")
# Row names that stand for a strategy spec with its weights flag.
SHORTHANDS = {"from-scratch": "full-unfreeze:weights=none"}
# The row whose strategy `finetune.tuning.advisor` chooses, per seed, on the validation split.
ADVISED = "advised"
COMPARE_PRESETS: dict[str, dict[str, Any]] = {
    # The reference work: ResNet50 ImageNet weights, iNaturalist 12K, 224 px, batch 32, Adam.
    "reference": {"backbone": "resnet50", "epochs": 5, "train_per_class": None, "val_split": 0.2,
                  "image_size": 224, "batch_size": 32, "lr": 1e-4, "pre_resize": True,
                  "augment": "flip", "jobs": 1, "tune": "none"},
    # Minutes on a 2-core CPU: 20 images per class (16 train + 4 val), 160 px, 3 epochs, batch
    # 16 for more steps per image; Adam at 5e-4 so a linear probe gets somewhere in 60 steps
    # without wrecking full fine-tuning. The test set is always the whole test/val folder.
    # Un-augmented: fixed images let the frozen strategies train on cached activations (the
    # accuracy effect is measured in docs/benchmarks.md). Runs side by side on a CPU, one per
    # core (`pool.auto_jobs`): one run alone does not keep two cores busy. Each strategy at
    # its own lr, chosen on validation from a grid around 5e-4 (`finetune.tuning`): one shared
    # lr would decide the ranking (docs/benchmarks.md).
    "quick": {"backbone": "auto", "epochs": 3, "train_per_class": 20, "val_split": 0.2,
              "image_size": 160, "batch_size": 16, "lr": 5e-4, "pre_resize": False,
              "augment": "none", "jobs": "auto", "tune": "lr"},
}


COMMAND = "compare"
# Beyond the settings a resumed run keeps, a comparison's rows must share these: rows of
# other lengths or devices are not comparable side by side.
COMPARED_ALSO = ("epochs", "device")


def training_names() -> tuple[str, ...]:
    """The declared settings a comparison takes (`finetune.settings`), by name."""
    return tuple(field.name for cls in setting_classes() for field, flag in declared(cls)
                 if flag.flag is not None and COMMAND in flag.commands)


def training_settings(values: dict[str, Any]) -> dict[str, Any]:
    """`values` checked and converted by their config classes (a results.json's lists become
    tuples again), completed with the declared defaults."""
    checked: dict[str, Any] = {}
    for cls in setting_classes():
        config = cls(**{k: v for k, v in values_of(cls, values).items() if v is not None
                        or default_of(attrs.fields_dict(cls)[k]) is None})
        checked.update(attrs.asdict(config, recurse=False))
    return {name: checked[name] for name in training_names()}


def _resume(**kwargs: Any) -> Any:
    """A field of the comparison's own that must be equal for `--resume` to reuse rows."""
    return attrs.field(metadata={"resume": True}, **kwargs)


@attrs.frozen(kw_only=True)
class Settings:
    """One comparison's settings: the preset with the command line's overrides on top.
    `training` holds every declared setting a comparison takes (`training_names`), which
    also read as attributes (`settings.lr`); the rest are the comparison's own."""

    backbone: str = _resume()
    data: str = _resume()
    training: dict[str, Any] = attrs.field(factory=dict, converter=training_settings)
    tta: str = _resume(default="none")  # the test pass's test-time augmentation
    # "lr": each row at its own lr, chosen on validation; "lr-find": the range test's suggestion
    tune: str = _resume(default="none")
    lr_grid: tuple[float, ...] = _resume(default=(), converter=tuple)  # the lrs "lr" tries
    # how "lr" compares candidates (finetune.tuning.search); None untuned, and in results written
    # before it existed — so a resume never mixes rows the previous race chose with these
    select: str | None = _resume(default=None)
    hindsight: bool = False  # also every grid lr at a fixed lr: `finetune.compare.hindsight`
    pre_resize: bool
    preset: str
    strategies: tuple[str, ...] = attrs.field(converter=tuple)
    seeds: tuple[int, ...] = attrs.field(converter=tuple)
    seeds_auto: bool = False  # more seeds where a run is cheap: see `run.auto_seeds`
    jobs: int = 1  # runs at once, each in its own process (`finetune.compare.pool`)
    command: str = ""
    backbone_choice: str | None = None
    loggers: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # each row's
    wandb_project: str | None = None
    wandb_group: str | None = None

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> Settings:
        """Settings from their flat form (`to_dict`, results.json): the declared settings
        gathered into `training`, older names included."""
        training: dict[str, Any] = {}
        for config in setting_classes():
            training.update(recorded(flat, config))
        own = {f.name for f in attrs.fields(cls)} - {"training"}
        return cls(training=training, **{k: v for k, v in flat.items() if k in own})

    def evolve(self, **changes: Any) -> Settings:
        """`attrs.evolve` that also takes declared settings by name (`lr=...`)."""
        training = {**self.training, **{k: changes.pop(k) for k in list(changes)
                                        if k in self.training}}
        return attrs.evolve(self, training=training, **changes)

    def __getattr__(self, name: str) -> Any:
        try:
            training = object.__getattribute__(self, "training")
        except AttributeError:  # while unpickling
            raise AttributeError(name) from None
        if name in training:
            return training[name]
        raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}")

    def data_config(self) -> DataConfig:
        data, _ = setting_classes()
        return data(**values_of(data, self.training))

    def train_config(self, seed: int, lr: float) -> TrainConfig:
        """A row's TrainConfig: these settings at its seed and lr."""
        _, train = setting_classes()
        return train(**{**values_of(train, self.training), "seed": seed, "lr": lr,
                        "class_weights": self.data_config().class_weights})

    def to_dict(self) -> dict[str, Any]:
        """Flat, as results.json holds it: the declared settings beside the comparison's."""
        own = {k: v for k, v in attrs.asdict(self, recurse=False).items() if k != "training"}
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in {**own, **self.training}.items()}

    def changed_from(self, previous: dict[str, Any]) -> list[str]:
        """`key: old -> new` for each setting that must match and differs from an earlier
        run's (results written before a setting existed ran with its default)."""
        ours = self.to_dict()
        old = {f.name: previous.get(f.name, None if f.default is attrs.NOTHING else f.default)
               for f in attrs.fields(Settings) if f.metadata.get("resume")}
        old = {name: _converted(name, value) for name, value in old.items()}
        earlier = {name: None for name in self.training}  # None: the declared default
        for cls in setting_classes():
            earlier.update(recorded(previous, cls))
        kept = set(kept_on_resume(*setting_classes())) | set(COMPARED_ALSO)
        defaults = {f.name: default_of(f) for cls in setting_classes() for f in attrs.fields(cls)}
        for name in self.training:
            if name in kept:
                value = earlier[name] if earlier[name] is not None else defaults[name]
                old[name] = training_settings({name: value})[name]
                old[name] = list(old[name]) if isinstance(old[name], tuple) else old[name]
        return [f"{name}: {old[name]!r} -> {ours[name]!r}" for name in old
                if old[name] != ours[name]]


def _converted(name: str, value: Any) -> Any:
    """An older results.json's value as the field holds it now, as a list where the field is
    a tuple (the form `to_dict` writes)."""
    converter = attrs.fields_dict(Settings)[name].converter
    if converter is None or value is None:
        return value
    value = converter(value)
    return list(value) if isinstance(value, tuple) else value


@attrs.frozen
class RunSpec:
    """One row's strategy and whether its backbone starts from pretrained weights."""

    label: str
    strategy: FreezeStrategy
    pretrained: bool = True


def parse_run(spec: str) -> RunSpec:
    """`name[:key=value]...[:weights=none]` -> RunSpec. `weights=none` trains from random
    init; `from-scratch` is short for `full-unfreeze:weights=none`. Strategy names and options
    are `finetune.parse_strategy`'s (presets such as `freeze-80` included)."""
    name, colon, rest = spec.partition(":")
    text = SHORTHANDS[name] + colon + rest if name in SHORTHANDS else spec
    items = re.split(r"[:,]", text)
    weights = [item.partition("=")[2].lower() for item in items if item.startswith("weights=")]
    if any(value not in ("none", "default") for value in weights):
        raise ValueError(f"bad option in '{spec}': weights takes none (random init) or default")
    strategy = finetune.parse_strategy(":".join(i for i in items if not i.startswith("weights=")))
    return RunSpec(spec, strategy, pretrained=not weights or weights[-1] == "default")


PROG = "finetune compare"
USAGE = """\
Compare freezing strategies on one dataset and backbone, with the same data split, epochs, lr
and seeds for all, and print a Markdown table.

    finetune compare                    # quick preset on the packaged sample, offline
    finetune compare --preset reference --data nature_12K.zip   # ResNet50, GPU
    finetune compare --data DIR --seeds 3 \\
        --strategies last-layer,lp-ft,freeze-fraction:fraction=0.5:count=numel

A strategy is a registered name or preset (`finetune.STRATEGIES`, `finetune.PRESETS`: e.g.
`freeze-80`), optionally followed by `:key=value` options; `+` joins tuple items
(`freeze-all-but:groups=layer4+head`); `:weights=none` trains that row from random init
(`from-scratch` is short for `full-unfreeze:weights=none`).
Rows are written to the output folder as each run finishes, so a crash or Ctrl-C keeps them and
`--resume` skips them. See docs/benchmarks.md for what each column measures. In a source
checkout `python -m benchmarks.compare` is the same command.
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(COMPARE_PRESETS), default="quick")
    p.add_argument("--data", help="an ImageFolder tree with train/ and test/ or val/, the "
                   "iNaturalist 12K zip or its folder, 'inaturalist' (downloaded once into the "
                   "cache folder), or 'sample'; default: the sample dataset shipped with the "
                   "package (10 classes, 360 images, offline)")
    p.add_argument("--backbone", help="any name `finetune train --backbone` takes: lite0, a "
                   "torchvision architecture, timm/<model>, ...")
    p.add_argument("--strategies", nargs="+", help="comma- or space-separated; default: "
                   + ",".join(DEFAULT_STRATEGIES))
    p.add_argument("--seeds", type=_seeds, default=1, help="runs per strategy (seeds 0..N-1), "
                   "or auto: each strategy as many seeds (1 to 5) as fit in the time of one "
                   "run of the slowest")
    p.add_argument("--tune", choices=TUNE_CHOICES, help="lr: each strategy at its own lr, "
                   "chosen on the validation split from --lr-grid (the test set is used once, "
                   "for the chosen lr); lr-find: each at the lr range test's suggestion; none: "
                   "every strategy at --lr (default: the preset's; quick: lr, reference: none)")
    p.add_argument("--lr-grid", type=argument_type(parse_grid),
                   help="the lrs --tune lr tries, comma-separated (default: --lr and its "
                   "neighbours two per decade, e.g. 1.6e-4,5e-4,1.6e-3); --lr is always one of "
                   "them, and the grid grows past an edge that wins")
    p.add_argument("--select", choices=SELECTIONS,
                   help="how --tune lr compares candidates on the validation split: loss "
                   "(cross-entropy; the default, measured best in docs/benchmarks.md), accuracy, "
                   "or accuracy+loss (accuracy, ties to the lower loss)")
    p.add_argument("--hindsight", action="store_true",
                   help="also train every lr the search could choose, each at a fixed lr to the "
                   "end, and report the best in hindsight beside each tuned row: what tuning "
                   "leaves on the table (a measurement; those runs read the test set per lr and "
                   "stay out of the table and the verdict)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="the test pass: flip averages each image's probabilities with its "
                   "mirror image's (default: none)")
    # every declared setting (finetune.settings), the presets' own defaulting to the preset
    from_preset = {key for preset in COMPARE_PRESETS.values() for key in preset}
    for cls in setting_classes():
        add_flags(p, cls, COMMAND, from_preset=sorted(from_preset),
                  parsers={"val_split": OPEN_FRACTION})
    p.add_argument("--jobs", type=_jobs, help="runs at once, each in its own process with "
                   "its share of the cores, or auto: one per core on a CPU (at most 4, and one "
                   "per 6 GiB of RAM), 1 on a GPU "
                   "(default: the preset's; quick: auto, reference: 1)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="train each run data-parallel on N processes of this machine (started "
                   "with torchrun; --batch-size is then per process); see docs/distributed.md")
    p.add_argument("--output", default="runs/compare", help="folder for results and plots")
    p.add_argument("--resume", action="store_true", help="skip runs already in --output "
                   "(with --store: retry the store's failed runs)")
    p.add_argument("--store", help="an SQLite file (or sqlite:///path) on a disk every worker "
                   "sees: several workers started with the same command and --store share the "
                   "runs, each claiming what nobody holds; see docs/distributed.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --output (refused otherwise)")
    p.add_argument("--logger", type=argument_type(logger_names), default=(),
                   metavar="wandb,tensorboard,csv",
                   help="log every row's epochs to any of these (comma-separated), each row "
                   "under its own run name, in --output/logs/ (wandb: one group per comparison)")
    p.add_argument("--wandb", action="store_true", help="log each run to wandb (offline "
                   "without an API key), all in one group")
    p.add_argument("--wandb-project", default="finetune-compare")
    add_config_flags(p)
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    use_config_file(p, argv)
    args = p.parse_args(argv)
    args.parser = p
    processes = max(args.nproc, int(os.environ.get("WORLD_SIZE", "1")))
    if processes > 1 and (args.tune or COMPARE_PRESETS[args.preset]["tune"]) == "lr-find":
        p.error("--tune lr-find: the range test trains in one process; on several processes "
                "use --tune lr (the search runs data-parallel), or run `finetune lr-find` "
                "first and give --tune none --lr X")
    if args.resume and args.overwrite:
        p.error("--resume keeps the rows in --output and --overwrite replaces them: pick one")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        p.error(f"--output {output} is a file, not a folder: give a folder for results.json, "
                "results.md and the plots (the file is left as it is)")
    try:
        check_image_fits(args.image_size, args.batch_size or 32)
    except ValueError as error:
        p.error(str(error))
    return args


def _jobs(text: str) -> int | str:
    return text if text == "auto" else positive_int(text)


def _seeds(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor auto") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {count}")
    return count


def strategy_specs(args: argparse.Namespace) -> list[str]:
    """--strategies split on commas; each parsed once, so a typo fails before anything
    trains."""
    specs = [s for item in (args.strategies or DEFAULT_STRATEGIES) for s in item.split(",") if s]
    for spec in specs:
        if spec == ADVISED:  # its strategy is chosen when it runs
            continue
        try:
            parse_run(spec)
        except ValueError as error:
            raise SystemExit(f"--strategies: {error}") from None
    return specs


def resolve_settings(args: argparse.Namespace, specs: Sequence[str], data: str,
                     command: str, wandb_group: str | None = None) -> Settings:
    """The preset with the command line's overrides on top."""
    chosen = dict(COMPARE_PRESETS[args.preset])
    for key in ("backbone", "jobs", "tune", "lr_grid", *training_names()):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if args.lr_grid is not None and chosen["tune"] != "lr":
        raise SystemExit("--lr-grid is the grid --tune lr searches; add --tune lr (or drop "
                         "--lr-grid: this preset trains every strategy at --lr)")
    if args.select is not None and chosen["tune"] != "lr":
        raise SystemExit("--select is how --tune lr chooses; add --tune lr (or drop --select)")
    chosen["lr_grid"] = (search_grid(chosen["lr"], chosen.get("lr_grid"))
                         if chosen["tune"] == "lr" else ())
    chosen["select"] = (args.select or "loss") if chosen["tune"] == "lr" else None
    if args.hindsight and chosen["tune"] != "lr":
        raise SystemExit("--hindsight measures what --tune lr leaves on the table; add --tune lr")
    if args.patience is not None and chosen["tune"] == "lr":
        raise SystemExit("--patience stops a run early, and --tune lr compares full runs: add "
                         "--tune none (or drop --patience)")
    if args.hindsight and args.store:
        raise SystemExit("--hindsight runs in one worker: drop --store (or --hindsight)")
    chosen["hindsight"] = args.hindsight
    chosen["tta"] = args.tta
    if chosen["backbone"] == "auto":
        chosen["backbone"] = default_backbone_name()
        chosen["backbone_choice"] = (
            "ResNet50 weights found in the torch hub cache" if chosen["backbone"] == "resnet50"
            else "ResNet50 weights not cached: packaged Lite0 weights")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc > 1 and args.jobs not in (None, "auto", 1):
        raise SystemExit("--jobs runs several single-process runs at once and --nproc one run "
                         "on several processes: pick one")
    if chosen["jobs"] == "auto":
        chosen["jobs"] = pool.auto_jobs(len(specs), args.device or "auto",
                                        max(world_size, args.nproc))
    if chosen["backbone"] == "lite0":
        chosen["backbone"] = "efficientnet_lite0"
    training = {name: chosen.pop(name) for name in training_names() if name in chosen}
    return Settings(**chosen, training=training, preset=args.preset, data=data,
                    strategies=specs, seeds=range(1 if args.seeds == "auto" else args.seeds),
                    seeds_auto=args.seeds == "auto", command=command,
                    loggers=tuple(dict.fromkeys(
                        (*args.logger, *(("wandb",) if args.wandb else ())))),
                    wandb_project=args.wandb_project if wandb_group else None,
                    wandb_group=wandb_group)
