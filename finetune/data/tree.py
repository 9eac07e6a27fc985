"""A dataset tree on disk: found, scanned, checked and split — before any loader or model.

`ImageSplits.scan(root)` finds the train and test folders (also inside a zip or one level
down), lists the classes, finds unreadable files, optionally makes the resized copy, and
splits validation images off train, stratified by class and seeded by `split_seed`. It needs
no `Preprocessing`: how images are decoded is the loaders' business (`ImageFolderData`).
"""

from __future__ import annotations

import os
import random
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from finetune.data.defaults import VAL_SPLIT
from finetune.data.download import safe_extract
from finetune.data.images import find_problems, list_classes, scan_split
from finetune.data.labels import LabelFile, LabelledImages, label_file, rows_of
from finetune.data.resized import resize_tree, resized_name
from finetune.data.sample import resolve_named_data
from finetune.errors import DataError

DATA_ENV = "FINETUNE_DATA"
Samples = list[tuple[Path, int]]


@attrs.frozen(kw_only=True)
class ImageSplits:
    """Which image files are train, val and test, and which were skipped (and why)."""

    root: Path
    classes: tuple[str, ...] = attrs.field(converter=tuple)
    train: Samples
    val: Samples
    test: Samples
    skipped: tuple[tuple[Path, str], ...] = ()
    resized_copy: Path | None = None  # where the pre-resized images live, if made
    val_split: float = 0.0
    split_seed: int = 0

    @classmethod
    def scan(
        cls,
        root: Path | str,
        *,
        val_split: float = VAL_SPLIT,
        split_seed: int = 0,
        train_per_class: int | None = None,
        pre_resize: int | None = None,
        cache_dir: Path | str | None = None,
        strict: bool = False,
        full_check: bool = False,
        test_dir: str | None = None,
        progress: bool = True,
    ) -> ImageSplits:
        """Scan `root` — a tree, its zip, or a label file (`finetune.data.labels`) — and split
        it. `pre_resize`: make a copy with this shorter side (in
        `cache_dir`) and read that; `strict`: an unreadable file is an error, not skipped."""
        check_split_arguments(val_split, train_per_class)
        labels = label_file(resolve_named_data(Path(root)).expanduser())
        if labels is not None:  # a label file: the same samples a tree would give
            labels, tree = labels.resolve(), labels.resolve().parent
            classes, train, test = LabelFile(labels).samples()
            if not test:
                raise DataError(f"{labels} has no test rows: add a split column marking the "
                                "test images test (or val), as a tree's val/ folder is its "
                                "test set")
            if pre_resize and not all(p.is_relative_to(tree) for p, _ in train + test):
                raise DataError(f"a pre-resized copy needs every image under {tree}; move "
                                "the images there or drop pre_resize")
        else:
            tree, train_folder, test_folder = find_tree(Path(root), test_dir)
            classes = list_classes(train_folder)
            train = scan_split(train_folder, classes)
            _check_same_classes(classes, list_classes(test_folder), train_folder, test_folder)
            test = scan_split(test_folder, classes)
        copy = None
        if pre_resize:
            copy, train, test, problems = _pre_resize(tree, train, test, pre_resize, cache_dir,
                                                      progress)
        else:
            problems = find_problems([p for p, _ in train + test], full=full_check)
        return cls._split(labels or tree, classes, train, test, problems, copy, strict=strict,
                          val_split=val_split, split_seed=split_seed,
                          train_per_class=train_per_class)

    @classmethod
    def from_labels(cls, paths: Iterable[Any], labels: Iterable[Any],
                    splits: Iterable[Any] | None = None, *, folder: Path | str = ".",
                    val_split: float = VAL_SPLIT, split_seed: int = 0,
                    train_per_class: int | None = None, strict: bool = False,
                    full_check: bool = False) -> ImageSplits:
        """Images named by paths (relative to `folder`) and labels — a DataFrame's columns,
        or two lists — with an optional split per image (train, val or test, as in a label
        file: `finetune.data.labels`); split exactly as the same images in a tree."""
        check_split_arguments(val_split, train_per_class)
        tree = Path(folder).expanduser()
        images = LabelledImages(rows_of(paths, labels, splits), tree, "the labelled images")
        classes, train, test = images.samples()
        problems = find_problems([p for p, _ in train + test], full=full_check)
        return cls._split(tree, classes, train, test, problems, None, strict=strict,
                          val_split=val_split, split_seed=split_seed,
                          train_per_class=train_per_class)

    @classmethod
    def from_dataframe(cls, frame: Any, *, path: str = "path", label: str = "label",
                       split: str = "split", **options: Any) -> ImageSplits:
        """`from_labels` over a DataFrame's `path` and `label` columns (and `split`, where
        it has one): fastai's `ImageDataLoaders.from_df` convention. pandas is not needed
        here; anything indexable by column name is."""
        columns = list(getattr(frame, "columns", frame))
        for name in (path, label):
            if name not in columns:
                raise DataError(f"the DataFrame has no column {name!r} (its columns: "
                                f"{', '.join(map(str, columns))}); name it with {name}=...")
        return cls.from_labels(frame[path], frame[label],
                               frame[split] if split in columns else None, **options)

    @classmethod
    def _split(cls, tree: Path, classes: Sequence[str], train: Samples, test: Samples,
               problems: dict[Path, str], copy: Path | None, *, strict: bool,
               val_split: float, split_seed: int, train_per_class: int | None
               ) -> ImageSplits:
        """Unreadable files reported and left out, then the seeded stratified split. `tree`
        is where the images came from: a tree's folder, or the label file naming them (what
        run.json records, so evaluate finds the same images)."""
        skipped = tuple(sorted(problems.items()))
        _report_skipped(skipped, strict)
        train = _without(train, problems, classes, tree)
        test = _without(test, problems, classes, tree) if test else []  # labels: maybe none
        train, val = stratified_split(train, val_split, split_seed, train_per_class)
        return cls(root=tree, classes=classes, train=train, val=val, test=test, skipped=skipped,
                   resized_copy=copy, val_split=val_split, split_seed=split_seed)


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


def _pre_resize(
    root: Path, train: Samples, test: Samples, side: int, cache_dir: Path | str | None,
    progress: bool,
) -> tuple[Path, Samples, Samples, dict[Path, str]]:
    files = [p for p, _ in train + test]
    cache_root = Path(cache_dir) if cache_dir is not None else None
    copy, problems = resize_tree(root, files, shorter_side=side,
                                       cache_root=cache_root, progress=progress)
    problems_cached = set(problems)

    def moved(samples: Samples) -> Samples:
        return [(p if p in problems_cached
                 else copy / resized_name(p.relative_to(root)), label)
                for p, label in samples]

    return copy, moved(train), moved(test), problems


def _report_skipped(skipped: tuple[tuple[Path, str], ...], strict: bool) -> None:
    """One message for every unreadable file, whether skipped or (strict) fatal."""
    if not skipped:
        return
    listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
    count = len(skipped)
    if strict:
        raise DataError(f"{count} image file(s) cannot be read:\n{listing}\n"
                        "Fix: remove or replace them, or pass strict=False to skip them.")
    warnings.warn(f"skipping {count} unreadable image file(s):\n{listing}", stacklevel=4)


def _without(samples: Samples, problems: dict[Path, str], classes: Sequence[str],
             root: Path) -> Samples:
    kept = [(p, label) for p, label in samples if p not in problems]
    missing = set(range(len(classes))) - {label for _, label in kept}
    if missing:
        names = [classes[i] for i in sorted(missing)]
        raise DataError(f"no readable images left in class(es) {names} under {root}; "
                        "replace the unreadable files listed above.")
    return kept


def check_split_arguments(val_split: float, train_per_class: int | None) -> None:
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split!r}")
    if train_per_class is not None and (not isinstance(train_per_class, int)
                                        or train_per_class < 1):
        raise DataError(f"train_per_class must be a positive integer, got {train_per_class!r}")
