"""`finetune evaluate`: rebuild the model a `finetune train` checkpoint holds (with the
preprocessing its run.json records) and report it per class on the test or validation set."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from finetune.callbacks import load_checkpoint
from finetune.callbacks.run_file import RUN_FILE, checkpoint_in, read_run_file
from finetune.data import DATA_ENV, ImageFolderData, resolve_data_root
from finetune.data.preprocessing import Preprocessing
from finetune.errors import CheckpointError, DataError
from finetune.model.zoo import build_backbone, is_import_path
from finetune.strategies import FreezeStrategy
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer


def recorded_backbone(spec: str, source: Path, given: str | None) -> str:
    """The backbone to rebuild: the recorded name, unless it is code (an import path) that
    the user has not named on the command line themselves."""
    if given is None and is_import_path(spec):
        raise CheckpointError(
            f"{source} names the backbone factory '{spec}', which is Python code; finetune "
            "never imports code named in a data file. If you trust this run folder, pass "
            f"--backbone {spec} (its module must be importable, e.g. via PYTHONPATH)."
        )
    return spec


def run_evaluate(args: argparse.Namespace) -> int:
    path = checkpoint_in(args.checkpoint, ("best.pt", "last.pt"))
    checkpoint = load_checkpoint(path)
    record = read_run_file(path)
    if path.name == "last.pt" and path != args.checkpoint:
        best = checkpoint.get("callbacks", {}).get("Checkpoint", {}).get("best_epoch")
        if best is not None:
            print(f"note: {path.parent} has no best.pt though last.pt records a best at epoch "
                  f"{best + 1}; evaluating last.pt (epoch {int(checkpoint['epoch']) + 1})",
                  file=sys.stderr)
    classes = list(checkpoint["classes"])
    num_classes = int(checkpoint["backbone"]["num_classes"])
    if record is None:
        spec = checkpoint["backbone"]["name"]
        print(f"note: no {RUN_FILE} beside {path}; assuming {spec} with its default "
              "preprocessing", file=sys.stderr)
        preprocessing = None
    else:
        saved_name = checkpoint["backbone"]["name"]
        if record["backbone_name"] != saved_name or record["classes"] != classes:
            raise CheckpointError(
                f"{path.parent / RUN_FILE} describes {record['backbone_name']} on "
                f"{record['classes']} but {path} holds {saved_name} on "
                f"{classes}; it belongs to another run."
            )
        spec = recorded_backbone(record["backbone"], path.parent / RUN_FILE, args.backbone)
        preprocessing = Preprocessing(**record["preprocessing"])
    # No pretrained weights: every weight comes from the checkpoint. A name read from a file
    # builds registered architectures only; an import path runs only when typed by the user.
    backbone = build_backbone(args.backbone or spec, num_classes, weights=None,
                              allow_import=args.backbone is not None)
    strategy = FreezeStrategy.from_state_dict(checkpoint["strategy"])
    strategy.apply(backbone)  # LoRA adds its adapters here, before their weights load
    try:
        backbone.model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {backbone.name}: {error}") from error
    data_root = args.data or (Path(record["data"]) if record else None) or os.environ.get(DATA_ENV)
    data = ImageFolderData(
        resolve_data_root(data_root), batch_size=args.batch_size, num_workers=args.workers,
        preprocessing=preprocessing or backbone.preprocessing, progress=False,
        val_split=record["val_split"] if record else 0.0, seed=record["seed"] if record else 0,
        train_per_class=record["train_per_class"] if record else None,
    )
    if list(data.classes) != classes:
        raise DataError(f"the data's classes {data.classes} are not the checkpoint's {classes}")
    loader = data.test_loader() if args.split == "test" else data.val_loader()
    config = TrainConfig(epochs=1, precision=args.precision, device=args.device,
                         channels_last=args.channels_last)
    report = Trainer(backbone, None, config, classes=classes).evaluate(loader)  # as it is
    print(f"{path} (epoch {int(checkpoint['epoch']) + 1}) on the {args.split} set of "
          f"{data.root}:\n{report.table()}")
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
