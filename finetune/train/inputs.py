"""What the loop needs to know of loaders and batches, and how it seeds them: plain functions,
so a custom loop can reuse them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.errors import DataError, DeviceError

LossSpec = nn.Module | type[nn.Module] | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def default_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec.partition(":")[2] or 0)
        if index >= available:
            raise DeviceError(
                f"device '{spec}' requested but this machine has "
                f"{available or 'no usable'} CUDA device{'s' if available != 1 else ''}; use "
                "--device auto (CUDA when present, else the CPU) or --device cpu."
            )
    return torch.device(spec)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) from a tuple/list batch, a dict batch, or bare images."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        labels = batch.get("label", batch.get("labels"))
        if images is None:
            raise ValueError(f"a dict batch needs an 'image' key; got keys {sorted(batch)}")
        return images, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read images and labels from a batch of type {type(batch).__name__}")


def sample_shape(loader: Iterable[Any], crop: int) -> tuple[int, ...]:
    dataset = getattr(loader, "dataset", None)
    try:
        images, _ = split_batch(dataset[0])  # type: ignore[index]
        return tuple(images.shape)
    except Exception:
        return (3, crop, crop)


def reseed(seed: int, loader: Iterable[Any]) -> None:
    """Seed every RNG from (seed, epoch): shuffling, dropout and augmentation of an epoch
    then do not depend on what ran before it, so a resumed run matches a straight one."""
    seed_everything(seed)
    for generator in (getattr(loader, "generator", None),
                      getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)


def loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def dataset_classes(loader: Iterable[Any]) -> list[Any] | None:
    """Class names a loader's dataset declares (ImageFolder, finetune.data), if any."""
    names = getattr(getattr(loader, "dataset", None), "classes", None)
    return list(names) if names is not None else None


def resolve_classes(classes: list[str] | None, loader: Iterable[Any], model: Any) -> list[str]:
    """Class names for reports: `classes` if given, else the loader's dataset's, else "0"…"K-1";
    refuses names that do not match `model.num_classes` (a head built for other data)."""
    if classes is None:
        names = dataset_classes(loader)
        if names is not None and len(names) != model.num_classes:
            raise DataError(
                f"the data has {len(names)} classes ({', '.join(map(str, names[:5]))}"
                f"{', …' if len(names) > 5 else ''}) but {model.name}'s head has "
                f"{model.num_classes} outputs; build the backbone with "
                f"num_classes={len(names)}."
            )
        classes = ([str(n) for n in names] if names is not None
                   else [str(i) for i in range(model.num_classes)])
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class head")
    return classes


def set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell an epoch-aware sampler (DistributedSampler, finetune.data's SeededShuffle) which
    epoch runs, so its order depends on the epoch number alone — also after a resume."""
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


def make_loss(loss: LossSpec, label_smoothing: float = 0.0
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function for a `Trainer(loss=...)` spec (None: cross-entropy, with
    `label_smoothing`; a custom loss smooths labels itself, if it wants to)."""
    if loss is None:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} applies to the default cross-entropy loss, "
            "but a custom loss= was given; smooth inside that loss (e.g. "
            "nn.CrossEntropyLoss(label_smoothing=...)) and leave label_smoothing at 0."
        )
    if isinstance(loss, type):
        return loss()
    if not callable(loss):
        raise TypeError(f"loss must be a module, a module class or a function, not {loss!r}")
    return loss
