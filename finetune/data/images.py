"""Reading real photo folders: which files are images, decoding any of them to RGB, and a
cheap check that catches unreadable or truncated files before training starts."""

from __future__ import annotations

import hashlib
import os
import time
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
        files = image_files(class_dir)
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                f". Fix: add its images, or delete the empty folder so '{name}' is not a class."
            )
        samples.extend((path, label) for path in files)
    return samples


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively and sorted (a seed means the same thing
    on every file system), outside hidden folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(map(_hidden, p.relative_to(folder).parents)))


def _hidden(path: Path) -> bool:
    """Hidden folders (`.thumbnails`, `.git`) and macOS `__MACOSX` junk, at any depth."""
    return path.name.startswith((".", "__MACOSX"))


# A file whose ctime is this recent when it is hashed may still change within the same clock
# tick (file systems stamp times from a coarse clock), so its key is not remembered.
_RACY_NS = 2_000_000_000
_KEYS: dict[str, tuple[tuple[int, ...], str]] = {}


def file_key(path: str | os.PathLike) -> str:
    """What identifies an image file's content: the SHA-256 of its bytes ("missing" if it
    cannot be read). Every store derived from an image file — the resized copy, the decoded
    pixels, the on-disk activation cache — is keyed by it, so no rewrite can serve stale
    pixels: size, mtime and inode survive an in-place rewrite whose mtime is set back.

    Within a process a key is remembered against the file's (device, inode, size, mtime,
    ctime) — ctime cannot be set back from user space — and only once the file has been
    unchanged for a couple of seconds; a copied or re-permissioned tree keeps its keys.
    SHA-256 runs at ~0.9 GB/s with the SHA extensions of current x86 CPUs: ~0.1 s for UC
    Merced's 84 MB (docs/data.md)."""
    name = os.fspath(path)
    try:
        before = _stat_key(name)
        remembered = _KEYS.get(name)
        if remembered is not None and remembered[0] == before:
            return remembered[1]
        hashed_at = time.time_ns()
        with open(name, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()[:32]
        after = _stat_key(name)
    except OSError:
        return "missing"
    if after == before and hashed_at - after[-1] > _RACY_NS:
        _KEYS[name] = (after, digest)
    return digest


def file_keys(paths: Sequence[Path]) -> list[str]:
    """`file_key` of each path, in order."""
    return [file_key(path) for path in paths]


def _stat_key(name: str) -> tuple[int, ...]:
    stat = os.stat(name)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
