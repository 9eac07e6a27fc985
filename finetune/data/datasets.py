"""`ImageFolderData`: seeded train/val/test loaders over a scanned and split tree
(`ImageSplits`), decoding images as a `Preprocessing` says — the data layer never sees a
model, only what its weights expect of an image."""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.decoded import DecodedImages, ImageFile
from finetune.data.defaults import AUGMENT, VAL_SPLIT
from finetune.data.images import file_keys, load_rgb
from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import (
    DEFAULT_CROP_SCALE,
    EvalTransform,
    augmentation,
    sized,
    train_transform,
)
from finetune.data.transforms import (
    crop_scale as check_crop_scale,
)
from finetune.data.tree import ImageSplits, Samples
from finetune.errors import DataError

_reported: set[Path] = set()


def default_num_workers() -> int:
    """One worker decodes while the main process trains; more would fight the model for the
    same cores (measured in benchmarks/data_pipeline.py, see docs/data.md)."""
    return 1 if (os.cpu_count() or 1) >= 2 else 0


@attrs.frozen
class DataSummary:
    """What a dataset holds: images per class per split, and the files that were skipped."""

    root: Path
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    skipped: tuple[tuple[Path, str], ...]
    preprocessing: Preprocessing
    resized_copy: Path | None

    def __str__(self) -> str:
        splits = list(self.counts)
        width = max(len(c) for c in (*self.classes, "total"))
        lines = [f"{self.root} · {len(self.classes)} classes",
                 f"{'class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
        for name in self.classes:
            lines.append(f"{name:<{width}}" + "".join(f"{self.counts[s][name]:>8}" for s in splits))
        lines.append(f"{'total':<{width}}"
                     + "".join(f"{sum(self.counts[s].values()):>8}" for s in splits))
        p = self.preprocessing
        lines.append(f"preprocessing: resize {p.resize_size}, crop {p.crop_size}, "
                     f"mean {p.mean}, std {p.std}, {p.interpolation}")
        if self.resized_copy:
            lines.append(f"pre-resized copy: {self.resized_copy}")
        lines.append(f"skipped files: {len(self.skipped)}")
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


class ImageDataset(Dataset):
    """(path, label) samples decoded to RGB and transformed. An index may come with a seed
    for its random augmentation, from `SeededShuffle`."""

    def __init__(self, samples: Samples, transform: Any, decode_size: int, strict: bool,
                 classes: Sequence[str] | None = None,
                 decoded: DecodedImages | None = None,
                 preprocessing: Preprocessing | None = None) -> None:
        self.samples, self.transform = samples, transform
        # what `transform` resizes, crops and normalises to: a checkpoint records it
        self.preprocessing = preprocessing
        self.decode_size, self.strict = decode_size, strict
        self.classes = list(classes) if classes is not None else None
        self.paths = [path for path, _ in samples]
        self.decoded: DecodedImages | None = None
        self.files: list[ImageFile] = []
        if decoded is not None:
            self.keep_decoded(decoded)

    def keep_decoded(self, store: DecodedImages) -> None:
        """Serve pixels from `store`, keyed by each file's content as it is now."""
        if not isinstance(self.transform, EvalTransform):
            raise ValueError("only un-augmented images (EvalTransform) can be kept decoded")
        self.decoded = store
        self.files = list(zip(self.paths, file_keys(self.paths), strict=True))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def deterministic(self) -> bool:
        """Whether an index always gives the same tensor (no random augmentation), which lets
        the Trainer cache a frozen prefix's activations exactly."""
        return isinstance(self.transform, EvalTransform)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            path, label = self.samples[position]
            try:
                if self.decoded is not None:
                    pixels = self.decoded.pixels(self.files[position], self.transform,
                                                 self.files, self._pixels)
                    return self.transform.normalise(pixels), label
                image = load_rgb(path, self.decode_size)
            except Exception as error:  # PIL raises many types for bad files
                self._bad_file(path, error)
                continue
            return self.transform(image, random.Random(seed)), label
        raise DataError("no image of this dataset can be decoded; check the files' format.")

    def _pixels(self, path: Path) -> Any:
        return self.transform.pixels(load_rgb(path, self.decode_size))

    def _bad_file(self, path: Path, error: Exception) -> None:
        message = f"cannot decode {path} ({type(error).__name__}: {error})"
        if self.strict:
            raise DataError(message + "; remove or replace the file.") from error
        if path not in _reported:
            _reported.add(path)
            warnings.warn(message + "; using the next image instead.", stacklevel=2)


class SeededShuffle(Sampler):
    """A fresh permutation every epoch from a torch.Generator seeded by (seed, epoch), each
    index paired with a seed for its augmentation: the same seed gives the same batches,
    whatever the number of workers.

    With `weights` (one per sample, e.g. `balanced_weights`) an epoch is instead `size` draws
    with replacement, each index with probability proportional to its weight: the weighted
    sampler that lets rare classes be seen as often as common ones."""

    def __init__(self, size: int, seed: int, weights: Sequence[float] | None = None) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and (len(self.weights) != size or bool(
                (self.weights < 0).any()) or not float(self.weights.sum()) > 0):
            raise DataError(f"weights must be {size} non-negative numbers, not all zero")

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Resume at `epoch` (0-based): its next pass gives that epoch's order and crops."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.epoch += 1
        order = (torch.randperm(self.size, generator=generator) if self.weights is None else
                 torch.multinomial(self.weights, self.size, replacement=True,
                                   generator=generator)).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
        return iter(zip(order, seeds, strict=True))


def balanced_weights(labels: Sequence[int]) -> list[float]:
    """Per-sample weights 1 / (images of its class): each class is drawn equally often."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


class ImageFolderData:
    """Train/val/test loaders from `root`: a folder with `train/<class>/` and `val/<class>/`
    (or `test/`), a folder holding one such tree (the extracted iNaturalist 12K), a zip of
    either, "sample" (the 10-class aerial-image sample shipped with the package) — or from an
    `ImageSplits` already scanned. `val` is split off `train`, stratified
    by class and seeded by `split_seed`; the test loader reads the test folder. Images are
    decoded as `preprocessing` says (pass `backbone.preprocessing`), so each model gets its
    own resize, crop and mean/std; `image_size` trains at another crop size.

    `data_augmentation`: "none" (the default: fixed images, which frozen strategies train on
    as cached activations), "flip" (random resized crops within `crop_scale` of the area, and
    flips), or "trivial" / "randaugment" / "autoaugment" (torchvision's policies after the crop
    and flip); True/False mean "flip"/"none". `balanced_sampling` draws every class equally
    often per epoch (with replacement), for imbalanced data.

    `seed` sets both `split_seed` (which images are val) and `shuffle_seed` (the training
    order and augmentation); give either to set it alone. Unreadable or truncated files are
    found up front and skipped with one warning listing them (`strict=True` raises instead);
    `pre_resize=True` makes a one-time resized copy (shorter side 256) in `cache_dir`, which
    decodes ~800 px photos several times faster. `pin_memory` (default: when CUDA is
    available) puts batches in page-locked memory, so the Trainer's non-blocking copies to
    the GPU overlap the next batch's loading.

    `keep_decoded` (default True): un-augmented images — val, test, and train without
    augmentation — are decoded once and kept in memory as cropped uint8 pixels, within
    `DecodedImages`' budget (min(2 GiB, RAM/8)); their loaders need no worker processes, so
    `num_workers` applies to the augmented train loader and to whatever does not fit. Pass
    a `DecodedImages` to share one store between several `ImageFolderData` over the same
    files, or False to stream every epoch.
    """

    def __init__(
        self,
        root: Path | str | ImageSplits,
        *,
        val_split: float = VAL_SPLIT,
        seed: int = 0,
        split_seed: int | None = None,
        shuffle_seed: int | None = None,
        batch_size: int = 32,
        data_augmentation: bool | str = AUGMENT,
        crop_scale: float | tuple[float, float] = DEFAULT_CROP_SCALE,
        balanced_sampling: bool = False,
        preprocessing: Preprocessing | None = None,
        image_size: int | None = None,
        num_workers: int | None = None,
        train_per_class: int | None = None,
        pre_resize: bool | int = False,
        cache_dir: Path | str | None = None,
        strict: bool = False,
        full_check: bool = False,
        test_dir: str | None = None,
        progress: bool = True,
        pin_memory: bool | None = None,
        keep_decoded: bool | DecodedImages = True,
    ) -> None:
        _check_loader_arguments(batch_size, num_workers)
        self.decoded = (keep_decoded if isinstance(keep_decoded, DecodedImages)
                        else DecodedImages() if keep_decoded else None)
        self.preprocessing = sized(preprocessing or Preprocessing(), image_size)
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.batch_size, self.strict = batch_size, strict
        self.data_augmentation = augmentation(data_augmentation)
        self.crop_scale = check_crop_scale(crop_scale)
        self.balanced_sampling = bool(balanced_sampling)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        if isinstance(root, ImageSplits):
            self.splits = root
        else:
            side = max(256, self.preprocessing.resize_size) if pre_resize is True else pre_resize
            self.splits = ImageSplits.scan(
                root, val_split=val_split, split_seed=seed if split_seed is None else split_seed,
                train_per_class=train_per_class, pre_resize=int(side) or None,
                cache_dir=cache_dir, strict=strict, full_check=full_check, test_dir=test_dir,
                progress=progress)
        self.classes = list(self.splits.classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    # -- what the splits hold -----------------------------------------------------------------
    root = property(lambda self: self.splits.root)
    train_samples = property(lambda self: self.splits.train)
    val_samples = property(lambda self: self.splits.val)
    test_samples = property(lambda self: self.splits.test)
    skipped = property(lambda self: self.splits.skipped)
    val_split = property(lambda self: self.splits.val_split)
    split_seed = property(lambda self: self.splits.split_seed)
    resized_copy = property(lambda self: self.splits.resized_copy)

    @property
    def seed(self) -> int:
        """The shuffle seed (`seed=` set it together with the split seed)."""
        return self.shuffle_seed

    # -- loaders ------------------------------------------------------------------------------
    def train_loader(self, shuffle_seed: int | None = None) -> DataLoader:
        """Shuffled batches seeded by `shuffle_seed` (default: the data's own), augmented as
        `data_augmentation` says: one split, many seeded runs. With `balanced_sampling` each
        epoch draws as many images as the split holds, every class equally often (with
        replacement). A last batch of a single image is dropped, since BatchNorm cannot train
        on it."""
        transform = train_transform(self.preprocessing, self.data_augmentation, self.crop_scale)
        dataset = self._dataset(self.train_samples, transform)
        seed = self.shuffle_seed if shuffle_seed is None else shuffle_seed
        weights = (balanced_weights([label for _, label in self.train_samples])
                   if self.balanced_sampling else None)
        return self._loader(dataset, sampler=SeededShuffle(len(dataset), seed, weights),
                            drop_last=len(dataset) % self.batch_size == 1)

    def val_loader(self) -> DataLoader:
        if not self.val_samples:
            raise DataError("there is no validation set: val_split is 0 (or every class has a "
                            "single image). Pass val_split=0.1, say, for one.")
        return self._loader(self._dataset(self.val_samples, EvalTransform(self.preprocessing)))

    def test_loader(self) -> DataLoader:
        return self._loader(self._dataset(self.test_samples, EvalTransform(self.preprocessing)))

    def summary(self) -> DataSummary:
        splits = {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}
        counts = {
            split: {name: Counter(label for _, label in samples)[i]
                    for i, name in enumerate(self.classes)}
            for split, samples in splits.items()
        }
        return DataSummary(self.root, tuple(self.classes), counts, self.skipped,
                           self.preprocessing, self.resized_copy)

    # -- helpers ------------------------------------------------------------------------------
    def _dataset(self, samples: Samples, transform: Any) -> ImageDataset:
        dataset = ImageDataset(samples, transform, self.preprocessing.resize_size, self.strict,
                               self.classes, preprocessing=self.preprocessing)
        if (self.decoded is not None and isinstance(transform, EvalTransform)
                and self.decoded.admit(dataset.paths, transform, transform.pixel_bytes)):
            dataset.keep_decoded(self.decoded)
        return dataset

    def _loader(self, dataset: ImageDataset, sampler: Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
        # kept images are a numpy multiply-add away from a tensor: a worker would only add IPC
        workers = 0 if dataset.decoded is not None else self.num_workers
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
            num_workers=workers, persistent_workers=workers > 0,
            drop_last=drop_last, pin_memory=self.pin_memory,
        )


def _check_loader_arguments(batch_size: int, num_workers: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}")
