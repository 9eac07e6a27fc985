"""Checkpoint I/O: the format, every RNG's state, safe save/load and the resume checks.

`Trainer.state_dict()` says what a checkpoint holds; this module writes and reads it —
atomically, and with `weights_only=True` so loading never runs pickled code — and refuses a
resume that would not fit. `FreezeStrategy.from_state_dict` rebuilds the strategy it names.
"""

from __future__ import annotations

import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.atomic import atomic_write
from finetune.errors import CheckpointError
from finetune.model.backbone import Backbone
from finetune.model.weights import state_dict_mismatch
from finetune.settings import kept_on_resume
from finetune.strategies import FreezeStrategy
from finetune.train.config import setting_classes

CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """`torch.save` to a temp file beside `path`, fsync, then `os.replace` onto `path`."""
    return atomic_write(path, lambda file: torch.save(state, file), durable=True)


def file_kind(path: Path) -> str:
    """What a file is, from its first bytes: "torch" (torch.save's zip or legacy pickle),
    "torchscript", "safetensors", or a description of something that is no checkpoint."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        return "torch" if any(name.endswith("data.pkl") for name in names) else "a zip archive"
    if head[:1] == b"\x80":
        return "torch"
    header_length = int.from_bytes(head[:8], "little")
    if head[8:10] in (b'{"', b"{ ") and header_length < 2**27:
        return "safetensors"
    for magic, kind in ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"),
                        (b"GIF8", "a GIF image"), (b"SQLite format", "an SQLite database")):
        if head.startswith(magic):
            return kind
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head):
        return "an ONNX model"
    return "not a file finetune wrote"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    kind = file_kind(path)
    if kind == "torchscript":
        raise CheckpointError(
            f"{path} is a TorchScript export (finetune export --format torchscript): load it "
            "with torch.jit.load; finetune reads a run folder, its best.pt/last.pt, or a "
            ".safetensors export")
    if kind == "safetensors":
        raise CheckpointError(
            f"{path} holds safetensors weights, not a checkpoint: finetune.load / finetune "
            "predict read it with the export's .json description beside it")
    if kind != "torch":
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint: give a run folder, its best.pt or last.pt, "
            "or a .safetensors export")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects besides tensors and plain "
            "data, and loading those could run code. finetune never does; a checkpoint written "
            "by finetune's Checkpoint callback holds none. Re-train, or load only the weights "
            "from a file you trust with your own code."
        ) from None
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {reason}); it must be a "
            "file written by finetune's Checkpoint callback."
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a finetune checkpoint (format {CHECKPOINT_FORMAT}); for bare model "
            "weights use backbone.model.load_state_dict(torch.load(path, weights_only=True))."
        )
    return state


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain data (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])




def check_same_data(checkpoint: dict[str, Any], data: dict[str, Any],
                    path: str | Path | None) -> None:
    """Refuse a resume on other classes or other training images than the checkpoint's."""
    theirs = checkpoint.get("data") or {"classes": checkpoint.get("classes"), "samples": None}
    if theirs["classes"] and theirs["classes"] != data["classes"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on the classes {theirs['classes']}, but this data "
            f"has {data['classes']}; resume on the data it was trained on, or start a new run "
            "in another folder."
        )
    if theirs["samples"] is not None and data["samples"] not in (None, theirs["samples"]):
        raise CheckpointError(
            f"checkpoint {path} was trained on {theirs['count']} other images than the "
            f"{data['count']} this loader holds; resume with the same data, validation split, "
            "seed and per-class limit, or start a new run in another folder."
        )


def warn_on_changed_settings(checkpoint: dict[str, Any], config: Any,
                             path: str | Path | None) -> None:
    """A resumed run that trains differently from how it started is allowed, but said."""
    saved = checkpoint.get("config") or {}
    # a decaying lr schedule is planned over the run's epochs: more or fewer reshape its curve
    # the settings whose change alters the outcome (declared with `resume=True`); the others
    # (epochs, device, layout, cache settings) are expected to differ
    decays = saved.get("schedule", "constant") != "constant"
    names = kept_on_resume(setting_classes()[1]) + (("epochs",) if decays else ())
    changed = [f"{name} {getattr(config, name)!r} (was {saved[name]!r})"
               for name in names if name in saved and saved[name] != getattr(config, name)]
    if changed:
        warnings.warn(f"resuming {path} with other settings: {', '.join(changed)}; the result "
                      "will differ from an uninterrupted run.", RuntimeWarning, stacklevel=4)


def check_compatible(checkpoint: dict[str, Any], backbone: Backbone, strategy: FreezeStrategy,
                     path: str | Path | None, data: dict[str, Any] | None = None,
                     config: Any = None) -> None:
    """Refuse a resume into another architecture, head size, strategy or weight layout, or
    (given the trainer's `data_identity`) other data; warn when `config` trains differently."""
    ours = {"name": backbone.name, "num_classes": backbone.num_classes}
    theirs = checkpoint["backbone"]
    if theirs != ours:
        raise CheckpointError(
            f"checkpoint {path} holds {theirs['name']} with {theirs['num_classes']} classes, "
            f"but this trainer has {ours['name']} with {ours['num_classes']} classes; resume "
            "with the backbone the checkpoint was trained with."
        )
    if checkpoint["strategy"] != strategy.state_dict():
        raise CheckpointError(
            f"checkpoint {path} was trained with strategy {checkpoint['strategy']}, but this "
            f"trainer uses {strategy.state_dict()}; resume with the same strategy."
        )
    mismatch = state_dict_mismatch(backbone.model.state_dict(), checkpoint["model"])
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} does not fit {backbone.name}: {mismatch}"
        )
    if data is not None:
        check_same_data(checkpoint, data, path)
    if config is not None:
        warn_on_changed_settings(checkpoint, config, path)



def deployed_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's model is used with: its trained weights, with the moving
    average over them where the run kept one (`TrainConfig(ema_decay=...)`), since that is
    what the run validated."""
    weights = dict(checkpoint["model"])
    average = checkpoint.get("ema")
    if average:
        weights.update(average["weights"])
    return weights
