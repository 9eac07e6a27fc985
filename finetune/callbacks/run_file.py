"""`run.json`: how `finetune train` set up the backbone and the data (backbone spec, weights,
preprocessing at the trained image size, split), which a checkpoint alone does not record;
`finetune evaluate` reads it to rebuild the model and the test loader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.atomic import atomic_write_json
from finetune.errors import CheckpointError
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.trainer import Trainer

RUN_FILE = "run.json"
RUN_FORMAT = 1


def _number(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v < high


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


# what `finetune evaluate` and a resume read back: (field, what it should be, check)
FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("backbone", "a backbone name (text)", lambda v: isinstance(v, str) and bool(v)),
    ("backbone_name", "the architecture's name (text)", lambda v: isinstance(v, str)),
    ("num_classes", "a whole number of classes ≥ 1",
     lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    ("classes", "a list of class names", _strings),
    ("preprocessing", "an object of resize_size, crop_size, mean, std",
     lambda v: isinstance(v, dict) and {"resize_size", "crop_size", "mean", "std"} <= set(v)),
    ("strategy", "the strategy's record (an object with 'class')",
     lambda v: isinstance(v, dict) and isinstance(v.get("class"), str)),
    ("data", "the data folder (text)", lambda v: isinstance(v, str)),
    ("val_split", "a number in [0, 1)", _number(0, 1)),
    ("seed", "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("train_per_class", "null or a whole number ≥ 1",
     lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)),
)


def checkpoint_in(path: Path, order: tuple[str, ...]) -> Path:
    """`path` itself, or for a run folder the first of `order` it holds ("best.pt" first to
    evaluate, "last.pt" first to resume)."""
    if path.is_dir():
        for name in order:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no checkpoint in {path}: it holds neither {' nor '.join(order)}")
    return path


def write_run_file(directory: Path, record: dict[str, Any]) -> Path:
    """Write `run.json` atomically (temp file, then rename), so a crash never leaves half."""
    return atomic_write_json(directory / RUN_FILE, record, indent=2)


def read_run_file(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint.parent / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path} ({error}); delete it or re-train.") from error
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path} is not a finetune run file (format {RUN_FORMAT})")
    for field, expected, check in FIELDS:
        if field not in record:
            raise CheckpointError(f"{path} lacks the field '{field}' ({expected}); it was "
                                  "edited or cut short. Restore it, or delete it and pass the "
                                  "backbone and data on the command line.")
        if not check(record[field]):
            raise CheckpointError(f"{path}: field '{field}' should be {expected}, found "
                                  f"{record[field]!r}. Restore it, or delete run.json and pass "
                                  "the backbone and data on the command line.")
    return record


class RunFile(Callback):
    """Writes run.json when fit starts: after a resume was checked against the checkpoint,
    so a refused resume never overwrites the record of the run it belongs to."""

    def __init__(self, directory: Path, record: dict[str, Any]) -> None:
        self.directory, self.record = directory, record

    def on_fit_start(self, trainer: Trainer) -> None:
        # what precision and memory layout resolved to: they change the arithmetic
        self.record["chosen"] = {"precision": trainer.state.precision,
                                 "channels_last": trainer.state.channels_last}
        write_run_file(self.directory, self.record)
