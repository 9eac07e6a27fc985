"""Rebuild the sample dataset shipped in `finetune/data/sample/` from a UC Merced Land Use copy.

    python -m benchmarks.make_sample /path/to/UCMerced_LandUse/Images
    python -m benchmarks.make_sample /path/to/ucmerced --output /tmp/sample   # a train/val copy

The source is any folder whose class folders (`agricultural/`, `airplane/`, ...) hold the
images, directly (the original `Images/<class>/*.tif`) or one level down (`train/<class>/`,
`val/<class>/`). The selection depends only on the class and file names, never on the folder
layout, the file format or the order files are listed in: within each class, images are sorted
by sha1("<class>/<file stem>"), pixel-identical duplicates are dropped (UC Merced's
`airplane01` and `airplane02` are one image), and the first `--train` go to train/, the next
`--test` to test/. Each is resized to `--size` px on its shorter side and saved as JPEG.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from finetune.atomic import atomic_write
from finetune.data.images import IMAGE_EXTENSIONS
from finetune.data.sample import ATTRIBUTION, SAMPLE_CLASSES, SAMPLE_ROOT

SOURCE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | {".tif", ".tiff"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="UC Merced Land Use images (class folders)")
    p.add_argument("--output", type=Path, default=SAMPLE_ROOT,
                   help=f"folder to (re)write; default: the package's {SAMPLE_ROOT}")
    p.add_argument("--classes", default=",".join(SAMPLE_CLASSES))
    p.add_argument("--train", type=int, default=28, help="train images per class")
    p.add_argument("--test", type=int, default=8, help="test images per class")
    p.add_argument("--size", type=int, default=160, help="shorter side in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    return p.parse_args(argv)


def class_images(source: Path, name: str) -> list[Path]:
    """Every image of class `name` under `source`, in `<name>/` or `<split>/<name>/`."""
    folders = [source / name, *(d / name for d in sorted(source.iterdir()) if d.is_dir())]
    files = [f for d in folders if d.is_dir() for f in d.iterdir()
             if f.suffix.lower() in SOURCE_EXTENSIONS]
    if not files:
        raise SystemExit(f"no images of class '{name}' in {source}/{name}/ or "
                         f"{source}/<split>/{name}/; pass the folder that holds the class folders.")
    return files


def select(name: str, files: Sequence[Path], count: int) -> list[tuple[Path, Image.Image]]:
    """The first `count` distinct images of a class in sha1("<class>/<stem>") order."""
    ordered = sorted(files, key=lambda f: hashlib.sha1(f"{name}/{f.stem}".encode()).hexdigest())
    chosen: list[tuple[Path, Image.Image]] = []
    seen: set[str] = set()
    for path in ordered:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        chosen.append((path, image))
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"class '{name}' has {len(chosen)} distinct images, fewer than the "
                     f"{count} asked for; lower --train or --test.")


def shrink(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.LANCZOS)


def build(args: argparse.Namespace) -> int:
    """Write train/ and test/ beside the attribution; returns the bytes written."""
    classes = [c for c in args.classes.split(",") if c]
    staging = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    total = 0
    for name in classes:
        picked = select(name, class_images(args.source, name), args.train + args.test)
        for index, (path, image) in enumerate(picked):
            split = "train" if index < args.train else "test"
            target = staging / split / name / f"{path.stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shrink(image, args.size).save(target, quality=args.quality, optimize=True)
            total += target.stat().st_size
    # Only the image trees are replaced; the attribution text is kept under version control.
    for split in ("train", "test"):
        shutil.rmtree(args.output / split, ignore_errors=True)
        args.output.mkdir(parents=True, exist_ok=True)
        (staging / split).replace(args.output / split)
    shutil.rmtree(staging)
    if not (args.output / ATTRIBUTION).is_file():
        text = (SAMPLE_ROOT / ATTRIBUTION).read_bytes()
        atomic_write(args.output / ATTRIBUTION, lambda file: file.write(text))
    return total


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    total = build(args)
    print(f"wrote {args.output}/train and test: {total / 2**20:.2f} MiB of JPEG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
