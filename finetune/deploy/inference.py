"""Use a trained model: `load(path)` gives a `Classifier` that predicts PIL images, image files
or a tensor batch, from a run folder, a checkpoint or a safetensors export — without the
training data, and loading weights only (never pickled code).

`Classifier.predict_files` is what `finetune predict` runs: images are decoded and
preprocessed in worker threads while the model runs on the batch before, in inference mode and
the memory layout the run chose; an unreadable image gets its reason instead of a prediction
and the others go on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image
from torch import nn

from finetune.callbacks.run_file import checkpoint_in, read_run_file
from finetune.data.images import image_files, is_image_file, load_rgb, to_rgb
from finetune.data.labels import LabelFile, label_file
from finetune.data.preprocessing import Preprocessing, preprocessing_from_record
from finetune.data.transforms import EvalTransform
from finetune.errors import CheckpointError, DataError
from finetune.model.backbone import Backbone
from finetune.model.zoo import build_backbone, is_import_path
from finetune.runtime.distributed import local_device
from finetune.strategies import FreezeStrategy
from finetune.train.checkpoint import deployed_weights, file_kind, load_checkpoint
from finetune.train.trainer import TTA_MODES, average_probabilities

EXPORT_FORMAT = 1  # the JSON beside a safetensors export


@attrs.frozen
class Prediction:
    """One image's top-k classes and probabilities, or why it could not be read."""

    path: str
    classes: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    error: str | None = None


@attrs.frozen(kw_only=True)
class RunModel:
    """A trained model rebuilt from a run folder or checkpoint, and what describes it."""

    backbone: Backbone
    classes: list[str]
    preprocessing: Preprocessing
    checkpoint: dict[str, Any]
    record: dict[str, Any] | None
    path: Path
    spec: str  # the backbone as `build_backbone` takes it
    # why `preprocessing` may not be what the model trained with (None: it is recorded)
    assumed: str | None = None


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


def load_run(path: str | Path, backbone: str | None = None) -> RunModel:
    """The model a `finetune train` checkpoint (or its run folder: best.pt, else last.pt)
    holds, with the classes and, from run.json, the preprocessing it was trained with. No
    pretrained weights are fetched: every weight comes from the checkpoint."""
    path = checkpoint_in(Path(path), ("best.pt", "last.pt"))
    checkpoint = load_checkpoint(path)
    record = read_run_file(path)
    classes = list(checkpoint["classes"])
    num_classes = int(checkpoint["backbone"]["num_classes"])
    if record is None:
        spec = checkpoint["backbone"]["name"]
        recorded = checkpoint.get("preprocessing")
        preprocessing = (None if recorded is None
                         else preprocessing_from_record(recorded, f"{path} (its preprocessing)"))
    else:
        saved_name = checkpoint["backbone"]["name"]
        if record["backbone_name"] != saved_name or record["classes"] != classes:
            raise CheckpointError(
                f"{path.parent / 'run.json'} describes {record['backbone_name']} on "
                f"{record['classes']} but {path} holds {saved_name} on {classes}; it belongs "
                "to another run.")
        spec = recorded_backbone(record["backbone"], path.parent / "run.json", backbone)
        preprocessing = preprocessing_from_record(record["preprocessing"],
                                                  str(path.parent / "run.json"))
    model = build_backbone(backbone or spec, num_classes, weights=None,
                           allow_import=backbone is not None)
    strategy = FreezeStrategy.from_state_dict(checkpoint["strategy"])
    strategy.apply(model)  # LoRA adds its adapters here, before their weights load
    try:
        model.model.load_state_dict(deployed_weights(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {model.name}: {error}") from error
    assumed = None if preprocessing is not None else (
        f"{path} records no preprocessing and has no run.json beside it (a checkpoint from "
        f"before checkpoints carried it): assuming {model.name}'s default (resize "
        f"{model.preprocessing.resize_size}, crop {model.preprocessing.crop_size}); put the "
        "run's run.json beside it if it trained at another --image-size")
    return RunModel(backbone=model, classes=classes,
                    preprocessing=preprocessing or model.preprocessing, checkpoint=checkpoint,
                    record=record, path=path, spec=backbone or spec, assumed=assumed)


class Classifier:
    """A trained classifier ready to predict: `classes`, `preprocessing`, and `predict`.

    Runs in fp32 under `torch.inference_mode`, in `channels_last` where the run chose it, on
    `device` ("auto": CUDA when there is one)."""

    def __init__(self, model: nn.Module, classes: Sequence[str], preprocessing: Preprocessing,
                 *, device: str = "auto", channels_last: bool = False, source: str = "") -> None:
        self.device = local_device(device)
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.classes, self.preprocessing, self.source = list(classes), preprocessing, source
        self.transform = EvalTransform(preprocessing)

    # -- tensors ----------------------------------------------------------------------------------
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch (N, 3, H, W), on the CPU."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(batch).float().cpu()

    def probabilities(self, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Softmax probabilities; `tta="flip"` averages them with the mirrored images'."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if tta == "flip":
            return average_probabilities(self.logits(batch), self.logits(batch.flip(3))).exp()
        return self.logits(batch).softmax(dim=1)

    # -- images -----------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """One image (PIL, or a file) as the model's input (3, H, W)."""
        if not isinstance(image, Image.Image):
            image = load_rgb(image, min_size=self.preprocessing.resize_size)
        else:  # as a file is read: EXIF rotation, transparency on white, 16-bit scaled
            image = to_rgb(image)
        return self.transform(image)

    def predict(self, images: torch.Tensor | Sequence[Image.Image | str | os.PathLike],
                top_k: int = 5, tta: str = "none") -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) per image: PIL images, image paths, or a preprocessed
        tensor batch."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
        if not isinstance(images, torch.Tensor) and len(images) == 0:
            return []
        batch = images if isinstance(images, torch.Tensor) else torch.stack(
            [self.preprocess(image) for image in images])
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"a tensor batch must be (N, 3, H, W), preprocessed as "
                             f"`preprocess` does; got shape {tuple(batch.shape)}")
        if len(batch) == 0:
            return []
        return [list(zip(names, probs, strict=True))
                for names, probs in self._top(self.probabilities(batch, tta), top_k)]

    def predict_files(self, paths: Sequence[Path], top_k: int = 5, batch_size: int = 32,
                      workers: int | None = None, tta: str = "none") -> Iterator[Prediction]:
        """A `Prediction` per file, in order: decoding in `workers` threads overlaps the model
        running on the batch before; an unreadable file yields its reason."""
        if batch_size < 1 or top_k < 1:
            raise ValueError("batch_size and top_k must be >= 1")
        workers = workers or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending: collections.deque[tuple[Path, concurrent.futures.Future]] = (
                collections.deque())
            queue = iter(paths)

            def fill() -> None:  # keep two batches decoding ahead of the model
                while len(pending) < 2 * batch_size:
                    path = next(queue, None)
                    if path is None:
                        return
                    pending.append((path, pool.submit(_decode, self, path)))

            fill()
            while pending:
                chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill()
                decoded = [(path, future.result()) for path, future in chunk]
                good = [(path, tensor) for path, tensor in decoded
                        if isinstance(tensor, torch.Tensor)]
                tops = iter(self._top(self.probabilities(
                    torch.stack([t for _, t in good]), tta), top_k) if good else [])
                for path, result in decoded:
                    if isinstance(result, torch.Tensor):
                        names, probs = next(tops)
                        yield Prediction(str(path), names, probs)
                    else:
                        yield Prediction(str(path), error=result)

    def _top(self, probabilities: torch.Tensor, top_k: int
             ) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
        values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        return [(tuple(self.classes[i] for i in row), tuple(float(v) for v in vals))
                for row, vals in zip(indices.tolist(), values, strict=True)]


def _decode(classifier: Classifier, path: Path) -> torch.Tensor | str:
    try:
        return classifier.preprocess(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable image: {type(error).__name__}: {str(error).splitlines()[0]}"[:300]


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files from files, folders (recursively, sorted, as a dataset is scanned: hidden
    folders skipped), label files (the images they name: `finetune.data.labels`) and glob
    patterns (a folder it matches, as a folder), each file once
    however it was named (relative, absolute, twice), in the order given."""
    found: dict[Path, Path] = {}  # resolved -> as first given

    def add(paths: Iterable[Path]) -> None:
        for path in paths:
            found.setdefault(path.resolve(), path)

    missing = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        labels = label_file(path) if path.exists() else None
        if labels is not None:  # a label file (or metadata.csv folder): the images it names
            _, train, test = LabelFile(labels).samples_any_split()
            add(p for p, _ in train + test)
        elif path.is_dir():
            add(image_files(path))
        elif path.is_file():
            add([path])
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            for match in matches:
                if match.is_dir():
                    add(image_files(match))
                elif match.is_file() and is_image_file(match):
                    add([match])
            if not matches:
                missing.append(text)
        else:
            missing.append(text)
    if missing:
        raise DataError(f"no such file, folder or matching pattern: {', '.join(missing)}")
    if not found:
        raise DataError("no image files (.jpg, .jpeg, .png, …) in what was given")
    return list(found.values())


def load(path: str | os.PathLike, device: str = "auto", backbone: str | None = None
         ) -> Classifier:
    """A `Classifier` from a run folder, a `finetune train` checkpoint, or a `.safetensors`
    export (its `.json` beside it). `backbone`: an import path you trust, for runs whose
    backbone came from your own code (a name read from a file is never imported)."""
    path = Path(path)
    if path.suffix == ".safetensors" or (path.is_file() and file_kind(path) == "safetensors"):
        return load_safetensors(path, device=device, backbone=backbone)
    run = load_run(path, backbone)
    if run.assumed is not None:
        warnings.warn(run.assumed, UserWarning, stacklevel=2)
    return Classifier(run.backbone, run.classes, run.preprocessing, device=device,
                      channels_last=bool(run.checkpoint.get("channels_last")), source=str(path))


def export_description(run: RunModel) -> dict[str, Any]:
    """What a weights-only export must carry to be usable alone: the backbone, classes,
    preprocessing, and the strategy (LoRA changes the model's structure)."""
    return {"format": EXPORT_FORMAT, "backbone": run.spec, "backbone_name": run.backbone.name,
            "num_classes": run.backbone.num_classes, "classes": run.classes,
            "preprocessing": attrs.asdict(run.preprocessing),
            "strategy": run.checkpoint["strategy"],
            "channels_last": bool(run.checkpoint.get("channels_last"))}


def check_description(meta: dict[str, Any], source: Path) -> None:
    """Refuse an export description whose classes cannot name the model's outputs."""
    classes, outputs = meta.get("classes"), meta.get("num_classes")
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 2:
        raise CheckpointError(f"{source}: num_classes must be a whole number >= 2, got "
                              f"{outputs!r}")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{source}: classes must be a list of names in output order, "
                              f"got {type(classes).__name__}")
    if len(classes) != outputs:
        raise CheckpointError(f"{source}: {len(classes)} class names for a model with "
                              f"{outputs} outputs; list one name per output, in order")


def load_safetensors(path: Path, meta_path: Path | None = None, *, device: str = "auto",
                     backbone: str | None = None) -> Classifier:
    """A `Classifier` from safetensors weights and the description beside them (`meta_path`,
    default: the same name with `.json`)."""
    from safetensors.torch import load_file

    meta_path = meta_path or path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} needs {meta_path.name} beside it (classes, "
                              f"preprocessing, backbone): {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a finetune export description")
    check_description(meta, meta_path)
    spec = recorded_backbone(meta["backbone"], meta_path, backbone)
    model = build_backbone(backbone or spec, int(meta["num_classes"]), weights=None,
                           allow_import=backbone is not None)
    FreezeStrategy.from_state_dict(meta["strategy"]).apply(model)
    try:
        model.model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {model.name}: {error}") from error
    return Classifier(model, meta["classes"],
                      preprocessing_from_record(meta.get("preprocessing"), str(meta_path)),
                      device=device, channels_last=bool(meta.get("channels_last")),
                      source=str(path))
