"""Reading real photo folders: which files are images, decoding any of them to RGB, and a
cheap check that catches unreadable or truncated files before training starts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from finetune.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_TAIL_BYTES = 4096  # a JPEG may carry some padding after its end-of-image marker


def is_image_file(path: Path) -> bool:
    """By extension, so README.txt, .DS_Store or Thumbs.db in a class folder are ignored."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white rather than whatever colour the
    encoder left under them (often black), which would otherwise leak into training."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = image.point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: Path | str, min_size: int | None = None) -> Image.Image:
    """Decode an image as RGB. With `min_size`, a JPEG is decoded directly at the smallest
    1/2, 1/4 or 1/8 scale whose shorter side is still >= min_size (libjpeg's DCT scaling):
    an 800 px photo headed for a 256 px resize then decodes about 3x faster."""
    with Image.open(path) as image:
        if min_size is not None and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        image.load()
        return to_rgb(image)


def problem_with(path: Path, full: bool = False) -> str | None:
    """Why `path` cannot be used as an image, or None. The quick check reads the header and
    the file's end (JPEG end-of-image / PNG IEND marker), which catches truncated downloads
    without decoding; `full=True` decodes every pixel."""
    try:
        with Image.open(path) as image:
            if full:
                image.load()
                return None
            image_format = image.format
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(image_format or "")
    if marker is None:
        return None
    with open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        if marker in handle.read():
            return None
    # no end marker: truncated, or data appended after it (phones' "motion photos") — decode
    return None if problem_with(path, full=True) is None else f"truncated {image_format}"


def find_problems(paths: Sequence[Path], full: bool = False) -> dict[Path, str]:
    """`problem_with` over many files, in threads (PIL releases the GIL while decoding)."""
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: problem_with(p, full), paths, chunksize=64))
    return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason}


def list_classes(folder: Path) -> list[str]:
    """Class names are the sub-folders of a split folder, sorted (ImageFolder's convention)."""
    if not folder.is_dir():
        raise DataError(
            f"missing folder {folder}: expected one sub-folder per class of images there. "
            "Fix: point root at a tree laid out as <root>/train/<class>/*.jpg and "
            "<root>/val/<class>/*.jpg (or test/)."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p))
    if not classes:
        raise DataError(
            f"{folder} has no class sub-folders; put each class's images in "
            f"{folder}/<class name>/."
        )
    return classes


def scan_split(folder: Path, classes: Iterable[str]) -> list[tuple[Path, int]]:
    """(path, label) for every image file under folder/<class>/, recursively, in sorted order
    so that a seed means the same thing on every file system."""
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p)
                       and not any(map(_hidden, p.relative_to(class_dir).parents)))
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                f". Fix: add its images, or delete the empty folder so '{name}' is not a class."
            )
        samples.extend((path, label) for path in files)
    return samples


def _hidden(path: Path) -> bool:
    """Hidden folders (`.thumbnails`, `.git`) and macOS `__MACOSX` junk, at any depth."""
    return path.name.startswith((".", "__MACOSX"))


def file_stamp(path: str | os.PathLike) -> str:
    """Size, mtime and inode of a file: changes when an image is rewritten or another file is
    renamed onto its path (a swap keeps both mtimes), so nothing derived from the old file —
    its resized copy, its cached activations — is reused."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
