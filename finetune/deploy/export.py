"""Export a trained run for serving — ONNX, TorchScript, or safetensors weights — and verify
the file before keeping it.

Every format holds the whole classifier (head included) with a dynamic batch axis, and the
class names and preprocessing (ONNX: `metadata_props`; TorchScript: an extra file
`finetune.json`; safetensors: the file's metadata and a `.json` beside it). The export is
written to a temporary file, loaded back the way a user would load it (onnxruntime,
`torch.jit.load`, `finetune.load`), run on real images and compared with the PyTorch model:
beyond `tolerance` (max |logit difference|) it fails with `ExportError` and leaves no file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image

from finetune.atomic import atomic_write_json, current_umask
from finetune.deploy.inference import Classifier, RunModel, export_description, load_safetensors
from finetune.errors import FinetuneError

EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4
OPSET = 17


class ExportError(FinetuneError):
    """An export that could not be written or did not reproduce the model."""


@attrs.frozen
class Exported:
    """The file written, how far its logits were from PyTorch's, and on what."""

    path: Path
    format: str
    max_difference: float
    checked_on: str


def export(run: RunModel, fmt: str, output: str | os.PathLike,
           images: torch.Tensor | None = None, tolerance: float = TOLERANCE) -> Exported:
    """Write `run`'s model as `fmt` to `output` and verify it on `images` (a preprocessed
    batch; None: two random batches' worth, said in `checked_on`)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; give a file name, e.g. "
                          f"{output / ('model' + SUFFIXES[fmt])}")
    output.parent.mkdir(parents=True, exist_ok=True)  # as predict's --output
    model = run.backbone.to("cpu").eval()
    model.to(memory_format=torch.contiguous_format)
    checked_on = f"{len(images)} real images" if images is not None else "random inputs"
    if images is None:
        generator = torch.Generator().manual_seed(0)
        size = run.preprocessing.crop_size
        images = torch.randn(3, 3, size, size, generator=generator)
    with torch.inference_mode():
        expected = model(images).float()
    description = export_description(run)
    temporary = output.with_name(f".{output.name}.tmp")
    beside = output.with_suffix(".json")
    try:
        write, check = WRITERS[fmt]
        write(model, images, temporary, description)
        difference = float((check(temporary, images, description) - expected).abs().max())
        if not difference <= tolerance:
            raise ExportError(f"the {fmt} export of {run.path} gives logits up to {difference:.3g} "
                              f"away from the PyTorch model's (tolerance {tolerance:g}); "
                              "nothing was written")
        if fmt == "safetensors":
            atomic_write_json(beside, description, indent=2)
        os.chmod(temporary, 0o666 & ~current_umask())  # as any file the user writes
        os.replace(temporary, output)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"exporting {run.path} as {fmt} failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); nothing was "
                          "written") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        Path(f"{temporary}.json").unlink(missing_ok=True)
    return Exported(output, fmt, difference, checked_on)


def check_images(classifier: Classifier, paths: Sequence[Path], limit: int = 8
                 ) -> torch.Tensor | None:
    """Up to `limit` readable images from `paths`, preprocessed as the run was trained."""
    tensors = []
    for path in paths:
        # unreadable, as predict says of it: skipped (a decompression bomb too)
        with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError):
            tensors.append(classifier.preprocess(path))
        if len(tensors) == limit:
            break
    return torch.stack(tensors) if tensors else None


# -- the formats ----------------------------------------------------------------------------------
def _torchscript(model: torch.nn.Module, images: torch.Tensor, path: Path,
                 description: dict[str, Any]) -> None:
    with torch.no_grad(), warnings.catch_warnings():  # torch marks TorchScript deprecated;
        warnings.simplefilter("ignore")  # it is what the format is, and the check proves it
        traced = torch.jit.trace(model, images[:1])
        torch.jit.save(traced, str(path),
                       _extra_files={"finetune.json": json.dumps(description)})


def _check_torchscript(path: Path, images: torch.Tensor, _: dict[str, Any]) -> torch.Tensor:
    files = {"finetune.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files["finetune.json"]:
        raise ExportError("the TorchScript file lost its finetune.json description")
    with torch.inference_mode():
        return loaded(images).float()


def _onnx(model: torch.nn.Module, images: torch.Tensor, path: Path,
          description: dict[str, Any]) -> None:
    onnx = _require("onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked legacy
        torch.onnx.export(model, (images[:1],), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load(str(path))
    for key, value in (("finetune", json.dumps(description)),
                       ("classes", json.dumps(description["classes"])),
                       ("preprocessing", json.dumps(description["preprocessing"]))):
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _check_onnx(path: Path, images: torch.Tensor, _: dict[str, Any]) -> torch.Tensor:
    runtime = _require("onnxruntime")
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if "finetune" not in session.get_modelmeta().custom_metadata_map:
        raise ExportError("the ONNX file lost its metadata")
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).float()


def _safetensors(model: torch.nn.Module, images: torch.Tensor, path: Path,
                 description: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, str(path), metadata={"finetune": json.dumps(description)})
    atomic_write_json(Path(f"{path}.json"), description)  # what `load` reads to verify


def _check_safetensors(path: Path, images: torch.Tensor, description: dict[str, Any]
                       ) -> torch.Tensor:
    # the backbone as the run was loaded: an import path only where the user named it
    return load_safetensors(path, Path(f"{path}.json"), device="cpu",
                            backbone=description["backbone"]).logits(images)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"this format needs {module}: pip install 'finetune[export]' "
                          "(onnx and onnxruntime)") from None


Check = Callable[[Path, torch.Tensor, dict[str, Any]], torch.Tensor]
WRITERS: dict[str, tuple[Callable[..., None], Check]] = {
    "onnx": (_onnx, _check_onnx),
    "torchscript": (_torchscript, _check_torchscript),
    "safetensors": (_safetensors, _check_safetensors),
}
