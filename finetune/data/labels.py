"""Images named by a label file instead of class folders: a CSV (`path,label[,split]`, as
Kaggle's `train.csv` and fastai's `from_df` read it), JSON Lines with the same fields, or
Hugging Face's imagefolder layout (`metadata.csv` beside the images, `file_name,label`).

Paths are relative to the label file's folder (absolute ones are taken as they are); an id
without a suffix (`image_id` in Kaggle's files) finds `<id>.jpg`, `.jpeg` or `.png`. `split`
is `train`, `val` or `test`: `test` rows — or `val` rows, where there are no `test` rows, as a
tree's val/ folder is its test set — are the test set, and the validation split is carved from
the train rows with the same seeded, stratified split a tree gets; a file without a split
column is all training images, with no test set. Classes are the labels, sorted.

`LabelFile(path).samples()` returns what `ImageSplits.scan` takes from a tree: the classes, the
train and test (path, label) lists in the tree's order — by class, then path — so a dataset
described by a label file splits exactly as the same images in class folders do. Bad input is
one `DataError` naming the row and the fix, raised before anything is loaded or cached.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from finetune.data.images import IMAGE_EXTENSIONS
from finetune.errors import DataError

LABEL_SUFFIXES = (".csv", ".jsonl")
METADATA_FILE = "metadata.csv"  # Hugging Face imagefolder
PATH_COLUMNS = ("path", "file_name", "filename", "file", "image", "image_id", "filepath")
LABEL_COLUMNS = ("label", "class", "category", "species")
SPLITS = ("train", "val", "test")
ID_SUFFIXES = (".jpg", ".jpeg", ".png")
Samples = list[tuple[Path, int]]


def label_file(root: Path) -> Path | None:
    """The label file `root` names: itself (.csv, .jsonl) or the metadata.csv of a Hugging
    Face imagefolder folder; None for anything else (a tree, a zip)."""
    if root.is_file() and root.suffix.lower() in LABEL_SUFFIXES:
        return root
    if root.is_dir() and (root / METADATA_FILE).is_file() and not (root / "train").is_dir():
        return root / METADATA_FILE
    return None


@attrs.frozen
class Row:
    """One labelled image as the file gives it; `line` names it in errors."""

    line: str  # "line 3" in a file, "row 2" in a DataFrame
    path: str
    label: str
    split: str


@attrs.frozen
class LabelFile:
    """A label file and the images it names."""

    path: Path

    @property
    def folder(self) -> Path:
        return self.path.parent

    def rows(self) -> list[Row]:
        records = list(self._records())
        if not records:
            raise DataError(f"{self.path} names no images; add rows of path,label (a header "
                            "line first)")
        columns = set(records[0][1])
        path_key = _column(columns, PATH_COLUMNS, "image path", self.path)
        label_key = _column(columns, LABEL_COLUMNS, "label", self.path)
        rows = []
        for line, record in records:
            path, label = str(record.get(path_key) or "").strip(), record.get(label_key)
            split = str(record.get("split") or "train").strip().lower()
            if not path:
                raise DataError(f"{self.path}, {line}: no image path in column '{path_key}'; "
                                "fill it in or delete the row")
            if label is None or not str(label).strip():
                raise DataError(f"{self.path}, {line}: '{path}' has no label in column "
                                f"'{label_key}'; fill it in or delete the row")
            if split not in SPLITS:
                raise DataError(f"{self.path}, {line}: split '{split}' for '{path}' is not one "
                                f"of {', '.join(SPLITS)}; use train, val or test")
            rows.append(Row(line, path, str(label).strip(), split))
        return rows

    def samples(self) -> tuple[list[str], Samples, Samples]:
        """(classes, train, test) with paths resolved and checked."""
        return LabelledImages(self.rows(), self.folder, str(self.path)).samples()

    def samples_any_split(self) -> tuple[list[str], Samples, Samples]:
        """`samples`, for images to predict: every row counts, whatever its split."""
        rows = [attrs.evolve(row, split="train") for row in self.rows()]
        return LabelledImages(rows, self.folder, str(self.path)).samples()

    def _records(self) -> Iterable[tuple[str, dict[str, Any]]]:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(f"{self.path} is not UTF-8 text ({error}); save it as UTF-8 "
                            "CSV or JSON Lines") from None
        if self.path.suffix.lower() == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{self.path}, line {number}: not JSON ({error}); each "
                                    'line holds one object: {"path": ..., "label": ...}') from None
                if not isinstance(record, dict):
                    raise DataError(f"{self.path}, line {number}: expected an object with path "
                                    f"and label, got {type(record).__name__}")
                yield f"line {number}", record
            return
        reader = csv.DictReader(text.splitlines())
        for number, record in enumerate(reader, start=2):  # line 1 is the header
            yield f"line {number}", record

@attrs.frozen
class LabelledImages:
    """Rows of (path, label, split) from any source — a label file, a DataFrame, two lists
    — resolved against `folder` and checked; `source` names them in errors."""

    rows: Sequence[Row]
    folder: Path
    source: str

    def samples(self) -> tuple[list[str], Samples, Samples]:
        """(classes, train, test) with paths resolved and checked."""
        rows = list(self.rows)
        files = {row.line: self._resolve(row) for row in rows}
        _refuse_duplicates(rows, files, self.source)
        has_test = any(row.split == "test" for row in rows)
        test_split = "test" if has_test else "val"
        train_rows = [row for row in rows if row.split == "train"]
        test_rows = [row for row in rows if row.split == test_split]
        if has_test and any(row.split == "val" for row in rows):
            raise DataError(f"{self.source} has both val and test rows; the validation split is "
                            "carved from the train rows (--val-split): mark those rows train")
        classes = sorted({row.label for row in rows})
        trained = {row.label for row in train_rows}
        untrained = [name for name in classes if name not in trained]
        if untrained:
            raise DataError(f"{self.source}: class(es) {untrained} have no train rows; add "
                            "training images for them or delete their rows")
        index = {name: i for i, name in enumerate(classes)}

        def ordered(chosen: Sequence[Row]) -> Samples:
            return sorted(((files[row.line], index[row.label]) for row in chosen),
                          key=lambda sample: (sample[1], str(sample[0])))

        return classes, ordered(train_rows), ordered(test_rows)

    def _resolve(self, row: Row) -> Path:
        given = Path(row.path).expanduser()
        path = given if given.is_absolute() else self.folder / given
        if not path.suffix and not path.is_file():
            found = [path.with_suffix(s) for s in ID_SUFFIXES if path.with_suffix(s).is_file()]
            path = found[0] if found else path
        if not path.is_file():
            raise DataError(f"{self.source}, {row.line}: {row.path!r} is not a file (looked for "
                            f"{path}); fix the path (relative to {self.folder}) or delete the "
                            "row")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{self.source}, {row.line}: {row.path!r} is not an image file "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return path



def _column(columns: set[str], names: Sequence[str], what: str, source: Path) -> str:
    for name in names:
        if name in columns:
            return name
    raise DataError(f"{source} has no {what} column: its columns are "
                    f"{', '.join(sorted(columns)) or 'none'}; name one of them "
                    f"{' or '.join(names[:3])}")


def rows_of(paths: Iterable[Any], labels: Iterable[Any], splits: Iterable[Any] | None = None
            ) -> list[Row]:
    """Rows from parallel sequences (a DataFrame's columns), numbered from 0 as `row N`."""
    paths, labels = list(paths), list(labels)
    splits = ["train"] * len(paths) if splits is None else list(splits)
    if not len(paths) == len(labels) == len(splits):
        raise DataError(f"{len(paths)} paths, {len(labels)} labels and {len(splits)} splits: "
                        "give one label (and split) per image")
    rows = []
    for index, (path, label, split) in enumerate(zip(paths, labels, splits, strict=True)):
        name = str(split).strip().lower() if split is not None else "train"
        if name not in SPLITS:
            raise DataError(f"row {index}: split '{split}' for '{path}' is not one of "
                            f"{', '.join(SPLITS)}; use train, val or test")
        if label is None or not str(label).strip():
            raise DataError(f"row {index}: '{path}' has no label; give it one or drop it")
        rows.append(Row(f"row {index}", str(path), str(label).strip(), name))
    return rows


def _refuse_duplicates(rows: Sequence[Row], files: dict[str, Path], source: str) -> None:
    seen: dict[Path, str] = {}
    for row in rows:
        resolved = files[row.line].resolve()
        if resolved in seen:
            raise DataError(f"{source}: {row.path!r} is named twice ({seen[resolved]} and "
                            f"{row.line}); keep one row per image")
        seen[resolved] = row.line


def write_label_file(path: Path, samples: Iterable[tuple[Path, str, str]]) -> Path:
    """A CSV of (image path, label, split) rows, paths relative to `path`'s folder where they
    lie under it: how a tree becomes a label file (tests, and users moving to one)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "split"])
    folder = path.parent.resolve()
    for image, label, split in samples:
        image = Path(image).resolve()
        written = image.relative_to(folder) if image.is_relative_to(folder) else image
        writer.writerow([written.as_posix(), label, split])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path
