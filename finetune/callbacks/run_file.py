"""`run.json`: how `finetune train` set up the backbone and the data (backbone spec, weights,
preprocessing at the trained image size, split), which a checkpoint alone does not record;
`finetune evaluate` reads it to rebuild the model and the test loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.atomic import atomic_write_json
from finetune.errors import CheckpointError
from finetune.train.events import Callback

if TYPE_CHECKING:
    from finetune.train.trainer import Trainer

RUN_FILE = "run.json"
RUN_FORMAT = 1


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
