"""One-time pre-resize of an image tree (shorter side 256 by default, JPEG).

iNaturalist photos are ~800 px; decoding them dominates the input pipeline on a small CPU.
The cache mirrors `<source>/<split>/<class>/<file>` as JPEGs whose shorter side is
`shorter_side`, in a folder keyed by the source path and the settings; a manifest records
each source file's content key (`file_key`), so later runs reuse it and redo exactly the files
whose bytes changed.
Unreadable files are found while building it and recorded there.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from finetune.atomic import atomic_write, atomic_write_json
from finetune.data.images import file_key, load_rgb

_VERSION = 1
_MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if "FINETUNE_CACHE" in os.environ:
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def resized_folder(source: Path, shorter_side: int, quality: int, cache_root: Path | None) -> Path:
    """Where the resized copy of `source` lives: its name shows the source, the hash pins
    the exact path and settings."""
    key = f"{source.resolve()}|{shorter_side}|{quality}|v{_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{source.name}-{shorter_side}-{digest}"
    return (cache_root or default_cache_root()) / "resized" / name


def resized_name(relative: Path) -> Path:
    """a/b.jpg stays a/b.jpg; a/b.png becomes a/b.png.jpg, so b.png and b.jpg never collide."""
    return relative if relative.suffix.lower() in (".jpg", ".jpeg") else Path(f"{relative}.jpg")


def resize_tree(
    source: Path,
    files: list[Path],
    *,
    shorter_side: int = 256,
    quality: int = 90,
    cache_root: Path | None = None,
    progress: bool = True,
) -> tuple[Path, dict[Path, str]]:
    """Resize `files` (all under `source`) into the cache. Returns the cache folder and the
    files that could not be decoded, with the reason."""
    folder = resized_folder(source, shorter_side, quality, cache_root)
    manifest_path = folder / _MANIFEST
    manifest = _read_manifest(manifest_path)
    entries: dict[str, dict] = manifest.get("files", {})
    todo = []
    for path in files:
        relative = str(path.relative_to(source))
        key = file_key(path)
        entry = entries.get(relative)
        target = folder / resized_name(Path(relative))
        if entry is None or entry.get("key") != key or (entry["error"] is None
                                                        and not target.is_file()):
            todo.append((path, relative, key, target))
    if todo:
        def work(item: tuple[Path, str, str, Path]) -> tuple[str, dict]:
            path, relative, key, target = item
            return relative, {"key": key, "error": _resize_one(path, target, shorter_side,
                                                                  quality)}

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = pool.map(work, todo)
            for relative, entry in tqdm(results, total=len(todo), desc="pre-resizing",
                                        unit="img", disable=not progress):
                entries[relative] = entry
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest_path, {"source": str(source.resolve()), "files": entries})
    wanted = {str(p.relative_to(source)) for p in files}
    errors = {source / r: e["error"] for r, e in entries.items() if r in wanted and e["error"]}
    return folder, errors


def _resize_one(path: Path, target: Path, shorter_side: int, quality: int) -> str | None:
    try:
        image = load_rgb(path, min_size=shorter_side)
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"
    scale = shorter_side / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    atomic_write(target, lambda file: image.save(file, format="JPEG", quality=quality))
    return None


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
