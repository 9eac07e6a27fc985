"""`ImageFolderData`: stratified, seeded train/val/test loaders from an ImageFolder tree,
an extracted iNaturalist 12K folder, or its zip, preprocessed the way the backbone expects."""

from __future__ import annotations

import os
import random
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.download import safe_extract
from finetune.data.images import find_problems, list_classes, load_rgb, scan_split
from finetune.data.preprocessing import Preprocessing
from finetune.data.resized import resize_tree, resized_name
from finetune.data.sample import resolve_named_data
from finetune.data.transforms import EvalTransform, TrainTransform, sized
from finetune.errors import DataError

Samples = list[tuple[Path, int]]
_reported: set[Path] = set()


DATA_ENV = "FINETUNE_DATA"


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
    cache: Path | None

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
        if self.cache:
            lines.append(f"pre-resized copy: {self.cache}")
        lines.append(f"skipped files: {len(self.skipped)}")
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


class ImageDataset(Dataset):
    """(path, label) samples decoded to RGB and transformed. An index may come with a seed
    for its random augmentation, from `SeededShuffle`."""

    def __init__(self, samples: Samples, transform: Any, decode_size: int, strict: bool,
                 classes: Sequence[str] | None = None) -> None:
        self.samples, self.transform = samples, transform
        self.decode_size, self.strict = decode_size, strict
        self.classes = list(classes) if classes is not None else None

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
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path, self.decode_size)
            except Exception as error:  # PIL raises many types for bad files
                self._bad_file(path, error)
                continue
            return self.transform(image, random.Random(seed)), label
        raise DataError("no image of this dataset can be decoded; check the files' format.")

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
    whatever the number of workers."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Resume at `epoch` (0-based): its next pass gives that epoch's order and crops."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.epoch += 1
        order = torch.randperm(self.size, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
        return iter(zip(order, seeds, strict=True))


def stratified_split(
    samples: Samples, val_split: float, seed: int, per_class: int | None = None
) -> tuple[Samples, Samples]:
    """Split each class on its own after a shuffle seeded by (seed, label): every class keeps
    its share in both parts, and no image is in both.
    `per_class` first keeps only the first N of each class's shuffled images (before the
    split, so train + val of a class hold at most N)."""
    by_label: dict[int, list[Path]] = {}
    for path, label in samples:
        by_label.setdefault(label, []).append(path)
    train: Samples = []
    val: Samples = []
    for label, paths in sorted(by_label.items()):
        paths = sorted(paths)
        random.Random(f"{seed}:{label}").shuffle(paths)
        paths = paths[:per_class] if per_class is not None else paths
        n_val = round(len(paths) * val_split)
        if val_split > 0 and len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        val += [(p, label) for p in paths[:n_val]]
        train += [(p, label) for p in paths[n_val:]]
    return train, val


class ImageFolderData:
    """Train/val/test loaders from `root`: a folder with `train/<class>/` and `val/<class>/`
    (or `test/`), a folder holding one such tree (the extracted iNaturalist 12K), a zip of
    either, or "sample" — the 10-class aerial-image sample shipped with the package. `val` is
    split off `train`, stratified by class and seeded; the test loader reads the test folder.
    Preprocessing comes from `backbone` (or `preprocessing`), so each model gets its own
    resize, crop and mean/std; `image_size` trains at another crop size.

    Unreadable or truncated files are found up front and skipped with one warning listing them
    (`strict=True` raises instead); `pre_resize=True` makes a one-time copy with shorter side
    256 in a cache folder (`cache_dir`), which decodes ~800 px photos several times faster.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        val_split: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        data_augmentation: bool = True,
        backbone: Any = None,
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
    ) -> None:
        _check_arguments(val_split, batch_size, num_workers, train_per_class)
        if preprocessing is None and backbone is not None:
            preprocessing = backbone.preprocessing
        self.preprocessing = sized(preprocessing or Preprocessing(), image_size)
        self.seed, self.batch_size, self.val_split = seed, batch_size, val_split
        self.data_augmentation, self.strict = data_augmentation, strict
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.root, train_folder, test_folder = find_tree(Path(root), test_dir)
        self.classes = list_classes(train_folder)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        train = scan_split(train_folder, self.classes)
        _check_same_classes(self.classes, list_classes(test_folder), train_folder, test_folder)
        test = scan_split(test_folder, self.classes)
        self.cache: Path | None = None
        if pre_resize:
            side = max(256, self.preprocessing.resize_size) if pre_resize is True else pre_resize
            train, test, problems = self._pre_resize(train, test, side, cache_dir, progress)
        else:
            problems = find_problems([p for p, _ in train + test], full=full_check)
        self.skipped = tuple(sorted(problems.items()))
        self._report_skipped()
        train, test = self._without(train, problems), self._without(test, problems)
        self.train_samples, self.val_samples = stratified_split(
            train, val_split, seed, train_per_class
        )
        self.test_samples = test

    # -- loaders ------------------------------------------------------------------------------
    def train_loader(self) -> DataLoader:
        """Shuffled (seeded) batches; augmented when `data_augmentation` is on. A last batch
        of a single image is dropped, since BatchNorm cannot train on it."""
        transform = (TrainTransform if self.data_augmentation else EvalTransform)(
            self.preprocessing
        )
        dataset = self._dataset(self.train_samples, transform)
        return self._loader(dataset, sampler=SeededShuffle(len(dataset), self.seed),
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
                           self.preprocessing, self.cache)

    # -- helpers ------------------------------------------------------------------------------
    def _dataset(self, samples: Samples, transform: Any) -> ImageDataset:
        return ImageDataset(samples, transform, self.preprocessing.resize_size, self.strict,
                            self.classes)

    def _loader(self, dataset: ImageDataset, sampler: Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def _pre_resize(
        self, train: Samples, test: Samples, side: int, cache_dir: Path | str | None,
        progress: bool,
    ) -> tuple[Samples, Samples, dict[Path, str]]:
        files = [p for p, _ in train + test]
        cache_root = Path(cache_dir) if cache_dir is not None else None
        self.cache, problems = resize_tree(self.root, files, shorter_side=side,
                                           cache_root=cache_root, progress=progress)
        problems_cached = set(problems)

        def moved(samples: Samples) -> Samples:
            return [(p if p in problems_cached
                     else self.cache / resized_name(p.relative_to(self.root)), label)
                    for p, label in samples]

        return moved(train), moved(test), problems

    def _report_skipped(self) -> None:
        """One message for every unreadable file, whether skipped or (strict) fatal."""
        if not self.skipped:
            return
        listing = "\n".join(f"  {path}: {reason}" for path, reason in self.skipped)
        count = len(self.skipped)
        if self.strict:
            raise DataError(f"{count} image file(s) cannot be read:\n{listing}\n"
                            "Fix: remove or replace them, or pass strict=False to skip them.")
        warnings.warn(f"skipping {count} unreadable image file(s):\n{listing}", stacklevel=3)

    def _without(self, samples: Samples, problems: dict[Path, str]) -> Samples:
        kept = [(p, label) for p, label in samples if p not in problems]
        missing = set(range(len(self.classes))) - {label for _, label in kept}
        if missing:
            names = [self.classes[i] for i in sorted(missing)]
            raise DataError(f"no readable images left in class(es) {names} under {self.root}; "
                            "replace the unreadable files listed above.")
        return kept


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """`root`, else `$FINETUNE_DATA`, else a DataError that says how to give one."""
    value = root if root is not None else os.environ.get(DATA_ENV)
    if not value:
        raise DataError(
            f"no dataset given: pass root='path/to/data' (an ImageFolder tree with train/ and "
            f"val/, the extracted iNaturalist 12K folder, or its zip) or set ${DATA_ENV}."
        )
    return Path(value)


def find_tree(root: Path, test_dir: str | None = None) -> tuple[Path, Path, Path]:
    """(tree, train folder, test folder) for a tree, a folder holding one, a zip, or the
    name "sample" (the packaged sample dataset)."""
    root = resolve_named_data(root).expanduser()
    if not root.exists():
        raise DataError(
            f"{root} does not exist. Fix: pass the folder holding train/ and val/ (or its zip); "
            "for iNaturalist 12K, INaturalist12K.download(folder) fetches it; \"sample\" is "
            "the small dataset packaged with finetune."
        )
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"{root} is a file but not a zip archive; pass a folder or a .zip.")
        target = root.with_suffix("") if root.suffix else root.with_name(root.name + "_files")
        root = safe_extract(root, target)
    tree = root if (root / "train").is_dir() else _single_tree_below(root)
    names = (test_dir,) if test_dir else ("test", "val")
    test = next((tree / n for n in names if (tree / n).is_dir()), None)
    if test is None:
        raise DataError(
            f"{tree} has a train/ folder but no {' or '.join(n + '/' for n in names)} test folder."
            f" Fix: put the held-out images in {tree / names[-1]}/<class>/ (or pass test_dir=)."
        )
    return tree, tree / "train", test


def _single_tree_below(root: Path) -> Path:
    trees = sorted(c for c in root.iterdir() if c.is_dir() and (c / "train").is_dir())
    if len(trees) == 1:
        return trees[0]
    found = ", ".join(sorted(c.name for c in root.iterdir() if c.is_dir())[:10]) or "nothing"
    raise DataError(
        f"missing train folder: {root} has no train/ (found: {found}). Fix: lay the images out "
        f"as {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg, or point root at the "
        "folder that holds train/."
    )


def _check_same_classes(train: Sequence[str], test: Sequence[str], train_folder: Path,
                        test_folder: Path) -> None:
    if list(train) == list(test):
        return
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    raise DataError(
        f"the test folder {test_folder} has other classes than {train_folder}: only in train "
        f"{only_train}, only in test {only_test}. Fix: give both the same class sub-folders "
        "(an empty class needs its images), so that labels mean the same thing in both."
    )


def _check_arguments(val_split: float, batch_size: int, num_workers: int | None,
                     train_per_class: int | None) -> None:
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if train_per_class is not None and (not isinstance(train_per_class, int)
                                        or train_per_class < 1):
        raise DataError(f"train_per_class must be a positive integer, got {train_per_class!r}")
