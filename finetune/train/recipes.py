"""The training recipes beyond the optimizer step: a moving average of the weights (EMA),
batch mixing (MixUp / CutMix) and class-balanced loss weights. Each is a small object a plain
loop can use as the Trainer does (docs/recipes.md), and each is measured there.

- `WeightAverage`: timm's `ModelEmaV3` semantics (decay warmed up as 1 - (1 + t)^(-2/3),
  capped at `decay`), over the weights that train only: a frozen prefix never changes, so
  averaging it would cost memory and time for nothing, and a strategy that unfreezes more
  later starts averaging those weights from their (unchanged) value. torch's `AveragedModel`
  copies the whole model and cannot follow what a strategy trains, hence this class.
- `BatchMixing`: torchvision.transforms.v2's `MixUp` / `CutMix` (one of the two per batch,
  chosen at random when both are on, as timm does) and the soft targets they make.
- `class_weights`: inverse class frequency, for a class-weighted cross-entropy.
- `describe`: the recipes a run used, in words, for model cards and comparison reports.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from finetune.data.transforms import DEFAULT_CROP_SCALE, augmentation
from finetune.errors import FinetuneError

WARMUP_POWER = 2 / 3  # timm's default: decay 0.9 after ~30 updates, 0.99 after ~1000


class WeightAverage:
    """An exponential moving average of `model`'s trainable parameters and of the floating
    buffers (BatchNorm statistics) of modules that train, updated after each optimizer step.

    `decay` caps the per-update decay; with `warmup` the decay of update t (1-based) is
    min(decay, 1 - t^(-2/3)) with 0 at the first, so the average starts at the weights and
    short fine-tuning runs (a few hundred steps) still average a useful window."""

    def __init__(self, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), e.g. 0.999 (got {decay!r})")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0
        self.averages: dict[str, torch.Tensor] = {}

    def decay_at(self, update: int) -> float:
        """The decay applied at `update` (1-based)."""
        if not self.warmup:
            return self.decay
        if update <= 1:
            return 0.0
        return min(self.decay, 1.0 - update ** -WARMUP_POWER)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold `model`'s current weights into the average (call after an optimizer step)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        averages, current = [], []
        for name, tensor in moving_tensors(model):
            average = self.averages.get(name)
            if average is None or average.shape != tensor.shape:
                self.averages[name] = tensor.detach().clone()  # starts at its value now
                continue
            if average.device != tensor.device:
                average = self.averages[name] = average.to(tensor.device)
            averages.append(average)
            current.append(tensor.detach())
        if averages:
            torch._foreach_lerp_(averages, current, weight)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block and its own after it."""
        saved = self._copy_into(model)
        try:
            yield
        finally:
            self._restore(model, saved)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averaged weights into `model` for good (the end of a fit)."""
        self._copy_into(model)

    @torch.no_grad()
    def _copy_into(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = dict(all_tensors(model))
        saved = {}
        for name, average in self.averages.items():
            target = tensors.get(name)
            if target is not None and target.shape == average.shape:
                saved[name] = target.detach().clone()
                target.copy_(average)
        return saved

    @torch.no_grad()
    def _restore(self, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        tensors = dict(all_tensors(model))
        for name, value in saved.items():
            tensors[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "weights": {k: v.detach().cpu() for k, v in self.averages.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.updates = int(state["updates"])
        self.averages = {k: v.clone() for k, v in state["weights"].items()}


def all_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def moving_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors a training step can change: parameters that train, and floating buffers
    of modules in training mode (BatchNorm statistics of the part that trains)."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            yield name, parameter
    for module_name, module in model.named_modules():
        if module.training:
            for name, buffer in module.named_buffers(prefix=module_name, recurse=False):
                if buffer.is_floating_point():
                    yield name, buffer


class BatchMixing:
    """MixUp (`mixup` = its Beta alpha) and/or CutMix (`cutmix` = alpha) of a training
    batch, as torchvision.transforms.v2 does them; with both, each batch takes one of the two
    at random. Returns the mixed images and soft targets (rows summing to one), which
    `nn.CrossEntropyLoss` takes as class probabilities. Random draws come from torch's global
    RNG, which the Trainer seeds per epoch."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        if mixup < 0 or cutmix < 0 or not (mixup or cutmix):
            raise ValueError(f"mixup and cutmix are Beta alphas >= 0, one of them > 0 (got "
                             f"mixup={mixup}, cutmix={cutmix}); 0.2 and 1.0 are usual")
        self.num_classes = num_classes
        mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
            [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.dim() != 1:
            raise ValueError("BatchMixing takes class indices (one per image)")
        layout = (torch.channels_last if images.dim() == 4
                  and images.is_contiguous(memory_format=torch.channels_last)
                  and not images.is_contiguous() else torch.contiguous_format)
        mixed, targets = self.transform(images, labels)
        return mixed.contiguous(memory_format=layout), targets


def class_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    counts = Counter(int(label) for label in labels)
    return [counts.get(k, 0) for k in range(num_classes)]


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled to average one over the images: N / (K * n_k), as
    scikit-learn's "balanced". A class absent from `labels` is refused, since its weight
    would be infinite."""
    counts = class_counts(labels, num_classes)
    missing = [k for k, n in enumerate(counts) if n == 0]
    if missing:
        raise FinetuneError(f"class weights need every class in the training data; classes "
                            f"{missing} have no image")
    total = sum(counts)
    return torch.tensor([total / (num_classes * n) for n in counts], dtype=torch.float32)


def dataset_labels(loader: Any) -> list[int] | None:
    """The label of every training sample, from the loader's dataset (finetune.data's and
    torchvision's ImageFolder list `samples`; others may give `targets`), if it says."""
    dataset = getattr(loader, "dataset", None)
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [int(label) for _, label in samples]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return None


def describe(settings: Mapping[str, Any]) -> list[str]:
    """The recipes a run used, in words, from its settings by their declared names (augment,
    crop_scale, ema_decay, mixup, cutmix, balance, label_smoothing, tta; older records' `ema`
    and augment True/False included); [] for a plain run. Said in Markdown: an EMA run's figures
    are of the average, which a reader must not miss."""
    parts = []
    policy = augmentation(settings.get("augment") or "none")
    if policy != "none":
        low, high = settings.get("crop_scale") or DEFAULT_CROP_SCALE
        parts.append(f"augmentation {policy} (crops {low:g}–{high:g} of the area)")
    decay = settings.get("ema_decay", settings.get("ema"))
    if decay:
        parts.append(f"**validation and test accuracies are of the EMA weights** (decay "
                     f"{decay:g})")
    mixes = [f"{name} {settings[key]:g}" for key, name in (("mixup", "MixUp"),
                                                            ("cutmix", "CutMix"))
             if settings.get(key)]
    if mixes:
        parts.append(" + ".join(mixes) + " (training pass uncached)")
    if settings.get("balance", "none") != "none":
        parts.append(f"class balance by {settings['balance']}")
    if settings.get("label_smoothing"):
        parts.append(f"label smoothing {settings['label_smoothing']:g}")
    if settings.get("tta", "none") != "none":
        parts.append(f"test-time augmentation {settings['tta']}")
    return parts
