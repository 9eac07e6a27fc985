"""`finetune advise`: which layers to freeze and what each choice costs (`finetune.tuning.advisor`),
as a table, advise.json / advise.md / frontier.png, and the `finetune train` command that
trains the recommendation."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path

from finetune.cli.options import data_config, train_config
from finetune.data import ImageFolderData, ImageSplits, resolve_data_root
from finetune.model.zoo import build_backbone
from finetune.runtime import distributed
from finetune.tuning.advisor import Advisor


def run_advise(args: argparse.Namespace) -> int:
    """Under torchrun every process measures its share; rank 0 alone prints and writes."""
    with distributed.joined(args.device):
        return _advise(args, distributed.say)


def _advise(args: argparse.Namespace, say: Callable[..., None]) -> int:
    output: Path = args.output
    if output.exists() and not output.is_dir():  # said before anything is measured
        args.parser.error(f"--output {output} is a file; advise writes a folder (advise.json, "
                          "advise.md): give a folder name")
    if (output / "advise.json").is_file() and not args.overwrite:
        args.parser.error(f"{output} holds earlier advice (advise.json); choose another "
                          "--output or pass --overwrite")
    if not args.val_split:
        args.parser.error("advice is measured on the validation split: give --val-split "
                          "above 0 (e.g. 0.2)")
    settings = data_config(args)
    splits = ImageSplits.scan(resolve_data_root(args.data), split_seed=args.seed,
                              progress=False, **settings.split_options())
    backbone = build_backbone(args.backbone, len(splits.classes), "DEFAULT", seed=args.seed)
    loading = {**settings.loader_options(), "data_augmentation": False}
    data = ImageFolderData(splits, seed=args.seed, preprocessing=backbone.preprocessing,
                           keep_decoded=True, **loading)  # every depth reads the same images
    say(f"data: {len(data.classes)} classes · train {len(data.train_samples)} · val "
          f"{len(data.val_samples)} images ({data.root}); the test set is not read")
    say(f"backbone: {backbone.name} · weights: {backbone.weights or 'random init'}")
    config = train_config(args)
    advisor = Advisor(config, finetune_epochs=args.finetune_epochs, budget=args.budget,
                      lr_grid=args.lr_grid,
                      train_command=train_command(args, data.root))
    advice = advisor.run(backbone, data.train_loader(), data.val_loader())
    say(advice.summary())
    if distributed.is_main():
        written = advice.write(output)
        say("wrote " + ", ".join(str(path) for path in written))
    return 0


def train_command(args: argparse.Namespace, root: str | Path) -> str:
    """`finetune train` with the data and model settings the advice was measured on (the
    data as it was typed: `sample` stays `sample`)."""
    words = ["finetune", "train", "--data", str(args.data or root), "--backbone", args.backbone,
             "--val-split", f"{args.val_split:g}", "--batch-size", str(args.batch_size),
             "--seed", str(args.seed)]
    if args.image_size is not None:
        words += ["--image-size", str(args.image_size)]
    if args.train_per_class is not None:
        words += ["--train-per-class", str(args.train_per_class)]
    return shlex.join(words)
