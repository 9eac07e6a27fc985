"""`finetune evaluate`: rebuild the model a `finetune train` checkpoint holds (with the
preprocessing its run.json records) and report it per class on the test or validation set.
Under torchrun each process evaluates its share of the images and rank 0 alone prints and
writes the report, which counts every image once (`Trainer.evaluate` shards and gathers)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.callbacks.run_file import RUN_FILE
from finetune.data import DATA_ENV, ImageFolderData, resolve_data_root
from finetune.data.images import load_rgb
from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import EvalTransform
from finetune.deploy.explain import explain, overlay_grid
from finetune.deploy.inference import load_run
from finetune.errors import DataError
from finetune.runtime import distributed
from finetune.stats.analysis import ErrorAnalysis, TopLoss, save_png
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer


def explained_grid(backbone: Any, preprocessing: Preprocessing, classes: list[str],
                   rows: list[TopLoss], folder: Path) -> Path:
    """explained.png: Grad-CAM of each image's predicted class beside the image."""
    transform = EvalTransform(preprocessing)
    pixels = [transform.pixels(load_rgb(row.path)) for row in rows]
    predicted = [classes.index(row.predicted) for row in rows]
    maps = explain(backbone.model, pixels, preprocessing, predicted)
    grid = overlay_grid(pixels, maps, [f"{row.true} -> {row.predicted} (looked at)"
                                       for row in rows])
    return save_png(folder / "explained.png", grid)


def run_evaluate(args: argparse.Namespace) -> int:
    with distributed.joined(args.device):
        return _evaluate(args, distributed.say)


def _evaluate(args: argparse.Namespace, say: Callable[..., None]) -> int:
    run = load_run(args.checkpoint, args.backbone)
    path, checkpoint, record, classes = run.path, run.checkpoint, run.record, run.classes
    if path.name == "last.pt" and path != args.checkpoint:
        best = checkpoint.get("callbacks", {}).get("Checkpoint", {}).get("best_epoch")
        if best is not None:
            say(f"note: {path.parent} has no best.pt though last.pt records a best at epoch "
                f"{best + 1}; evaluating last.pt (epoch {int(checkpoint['epoch']) + 1})",
                file=sys.stderr)
    if run.assumed is not None:
        say(f"note: {run.assumed}", file=sys.stderr)
    elif record is None:
        say(f"note: no {RUN_FILE} beside {path}; {run.spec} at the preprocessing the "
            "checkpoint records", file=sys.stderr)
    backbone, preprocessing = run.backbone, run.preprocessing
    data_root = args.data or (Path(record["data"]) if record else None) or os.environ.get(DATA_ENV)
    data = ImageFolderData(
        resolve_data_root(data_root), batch_size=args.batch_size, num_workers=args.workers,
        preprocessing=preprocessing, progress=False,
        val_split=record["val_split"] if record else 0.0, seed=record["seed"] if record else 0,
        train_per_class=record["train_per_class"] if record else None,
    )
    if list(data.classes) != classes:
        raise DataError(f"the data's classes {data.classes} are not the checkpoint's {classes}")
    loader = data.test_loader() if args.split == "test" else data.val_loader()
    config = TrainConfig(epochs=1, precision=args.precision, device=args.device,
                         channels_last=args.channels_last)
    trainer = Trainer(backbone, None, config, classes=classes)  # the model as it is
    report = trainer.evaluate(loader, tta=args.tta)
    flipped = " with flip test-time augmentation" if args.tta == "flip" else ""
    say(f"{path} (epoch {int(checkpoint['epoch']) + 1}) on the {args.split} set of "
        f"{data.root}{flipped}:\n{report.table()}")
    if args.json is not None and distributed.is_main():
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not args.no_analysis and distributed.is_main():
        samples = data.test_samples if args.split == "test" else data.val_samples
        analysis = ErrorAnalysis(report, [str(p) for p, _ in samples])
        folder = args.analysis or path.parent / f"analysis-{args.split}"
        written = analysis.write(folder, worst=args.worst)
        if args.explain:
            written.append(explained_grid(run.backbone, preprocessing, classes,
                                          analysis.top_losses()[:args.worst], folder))
        say(analysis.words())
        say("error analysis: " + ", ".join(str(p) for p in written))
    return 0
