"""Download (resumable, verified) and safe extraction of dataset archives; iNaturalist 12K.

The published archive's size and sha256 are not pinned here (they could not be checked when
this was written): pass them to `download` to have them verified. The archive is always
checked to be a readable zip with the expected top-level layout, and every member's CRC is
checked while extracting.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar
from urllib.parse import unquote, urlparse

from tqdm.auto import tqdm

from finetune.atomic import atomic_write, exclusive_lock
from finetune.errors import DataError

_CHUNK = 1 << 20
_DONE_MARKER = ".extracted"
_LOCK = ".extract.lock"
_PENDING = ".extracting"  # the top-level names an unfinished extraction moved into the target
_JUNK = ("__MACOSX/",)
MAX_EXTRACTED_BYTES = 64 << 30  # iNaturalist 12K is 3.6 GB; an order of magnitude above
MAX_RATIO = 100  # photos hardly compress; text does ~10x; a bomb does 1000x
_RATIO_FLOOR = 64 << 20  # small archives cannot hurt, whatever their ratio


# -- download ---------------------------------------------------------------------------------
def download_file(
    url: str,
    destination: Path | str,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch `url` (http, https or file) to `destination`, resuming `<destination>.part` if an
    earlier attempt was interrupted. Nothing is fetched when `destination` already exists and
    matches the expected size/sha256. The file only takes its final name once complete."""
    destination = Path(destination).expanduser()
    if destination.is_file():
        verify_file(destination, expected_size, sha256)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    if expected_size is not None and offset > expected_size:
        partial.unlink()
        offset = 0
    with _open_remote(url, offset, timeout) as (stream, start, total):
        mode = "ab" if start else "wb"
        with open(partial, mode) as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=destination.name, disable=not progress,
        ) as bar:
            try:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
                    if expected_size is not None and out.tell() > expected_size:
                        break  # handled below, once the file is closed
            except (http.client.IncompleteRead, OSError, TimeoutError) as error:
                raise DataError(
                    f"download of {url} was interrupted after {out.tell():,} bytes ({error}); "
                    f"the partial file {partial} is kept: call again to resume."
                ) from error
    got = partial.stat().st_size
    if expected_size is not None and got > expected_size:
        partial.unlink()
        raise DataError(
            f"{url} sent more than the expected {expected_size:,} bytes; stopped and removed "
            f"the download. Check the URL (and expected_size), then call again."
        )
    if total is not None and got != total:
        raise DataError(
            f"download of {url} stopped at {got:,} of {total:,} bytes; the partial file "
            f"{partial} is kept: call again to resume."
        )
    try:
        verify_file(partial, expected_size, sha256)
    except DataError as error:
        partial.unlink()
        raise DataError(f"{error} (The download from {url} was removed: call again to "
                        "download it afresh.)") from None
    os.replace(partial, destination)
    return destination


@contextmanager
def _open_remote(
    url: str, offset: int, timeout: float
) -> Iterator[tuple[BinaryIO, int, int | None]]:
    """(stream, offset it starts at, total size or None). Asks for a byte Range when resuming;
    a server that ignores it answers 200 and the download starts over."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        if not path.is_file():
            raise DataError(f"{url}: no such file {path}; fix the URL.")
        with open(path, "rb") as handle:
            size = path.stat().st_size
            start = min(offset, size)
            handle.seek(start)
            yield handle, start, size
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file already holds everything
            yield _Empty(), offset, offset
            return
        raise DataError(f"cannot download {url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DataError(
            f"cannot download {url} ({error}). Without internet, copy the archive next to "
            "the data root yourself, or pass url='file:///path/to/archive.zip'."
        ) from error
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        start = offset if response.status == 206 else 0
        total = start + length if length is not None else None
        yield response, start, total


class _Empty:
    def read(self, _size: int = -1) -> bytes:
        return b""


def verify_file(path: Path, expected_size: int | None, sha256: str | None) -> None:
    """Raise DataError when `path` has another size or sha256 than given (None: not checked)."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DataError(
            f"{path} is {size:,} bytes, expected {expected_size:,}: delete it and download again."
        )
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256.lower():
            raise DataError(
                f"{path} has sha256 {digest.hexdigest()}, expected {sha256.lower()}: the file is "
                "corrupt or not the expected archive; delete it and download it again."
            )


# -- extraction -------------------------------------------------------------------------------
def safe_extract(archive: Path | str, target: Path | str,
                 max_bytes: int = MAX_EXTRACTED_BYTES) -> Path:
    """Extract a zip into `target`, refusing any member that would land outside it (absolute
    paths, `..`, drive letters). Idempotent: a marker file records a finished extraction.

    Each process extracts into its own staging folder; the move into `target` happens under a
    lock and the marker is written only over a complete tree, so concurrent calls cannot mix
    two half-trees. Entries of `target` the archive did not create are never replaced: an
    archive whose top-level names collide with them is refused. An archive that would expand
    to more than `max_bytes`, or implausibly far (`check_expansion`), is refused unopened."""
    archive, target = Path(archive).expanduser(), Path(target).expanduser()
    marker = target / _DONE_MARKER
    if marker.is_file():
        return target
    members = zip_members(archive)
    for info in members:
        _check_member(info.filename, archive)
    check_expansion(members, archive, max_bytes)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        _extract_members(archive, members, staging)
        with exclusive_lock(target / _LOCK):
            if not marker.is_file():  # else another process finished while we extracted
                _move_into(staging, target, archive)
                atomic_write(marker, lambda f: f.write(f"{archive.resolve()}\n".encode()))
                (target / _PENDING).unlink()  # after the marker: a kill between keeps ours
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_members(archive: Path, members: list[zipfile.ZipInfo], staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as handle:
            for info in members:
                handle.extract(info, staging)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(
            f"{archive} is damaged ({error}); delete it and download it again."
        ) from error


def _move_into(staging: Path, target: Path, archive: Path) -> None:
    """Move the staged top-level entries into `target`. `_PENDING` lists them first, so an
    extraction killed midway may replace what it had already moved when run again — and
    nothing else."""
    pending = target / _PENDING
    ours = set(pending.read_text().split("\n")) - {""} if pending.is_file() else set()
    names = sorted(child.name for child in staging.iterdir())
    taken = [n for n in names if (target / n).exists() or (target / n).is_symlink()]
    foreign = [n for n in taken if n not in ours]
    if foreign:
        raise DataError(
            f"extracting {archive} into {target} would replace {', '.join(foreign)}, which the "
            "archive did not create; move them away or extract into another folder."
        )
    atomic_write(pending, lambda f: f.write("\n".join(sorted(ours | set(names))).encode()))
    for name in names:
        destination = target / name
        if name in taken:
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        os.replace(staging / name, destination)


def check_expansion(members: list[zipfile.ZipInfo], archive: Path, max_bytes: int) -> None:
    """Refuse a zip bomb before writing anything: more than `max_bytes` in all, or a large
    archive that claims to expand more than `MAX_RATIO` times (images hardly compress)."""
    expanded = sum(info.file_size for info in members)
    packed = sum(info.compress_size for info in members)
    if expanded > max_bytes or (expanded > _RATIO_FLOOR and expanded > MAX_RATIO * packed):
        raise DataError(
            f"{archive} would expand to {expanded:,} bytes from {packed:,} (limit {max_bytes:,} "
            f"bytes, {MAX_RATIO}x); refusing what looks like a zip bomb. If you trust it, pass "
            "max_bytes= to safe_extract, or unzip it yourself and pass the folder."
        )


def zip_members(archive: Path) -> list[zipfile.ZipInfo]:
    """The archive's members without macOS resource-fork junk; DataError if not a zip."""
    try:
        with zipfile.ZipFile(archive) as handle:
            return [
                i for i in handle.infolist()
                if not i.filename.startswith(_JUNK)
                and PurePosixPath(i.filename).name != ".DS_Store"
            ]
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(
            f"{archive} is not a readable zip archive ({error}); it is probably an incomplete "
            "or corrupt download: delete it and download it again."
        ) from error


def _check_member(name: str, archive: Path) -> None:
    normalised = name.replace("\\", "/")
    parts = PurePosixPath(normalised).parts
    if normalised.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise DataError(
            f"{archive} holds the member '{name}', which would be written outside the target "
            "folder; refusing to extract an archive that is unsafe or not the expected one."
        )


# -- iNaturalist 12K --------------------------------------------------------------------------
class INaturalist12K:
    """The iNaturalist 12K subset: 10 taxa, `inaturalist_12K/{train,val}/<class>/*.jpg`; the
    `val` folder is the reference work's test set."""

    URL: ClassVar[str] = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
    ARCHIVE: ClassVar[str] = "nature_12K.zip"
    FOLDER: ClassVar[str] = "inaturalist_12K"
    CLASSES: ClassVar[tuple[str, ...]] = (
        "Amphibia", "Animalia", "Arachnida", "Aves", "Fungi",
        "Insecta", "Mammalia", "Mollusca", "Plantae", "Reptilia",
    )

    @classmethod
    def download(
        cls,
        root: Path | str,
        *,
        url: str | None = None,
        expected_size: int | None = None,
        sha256: str | None = None,
        progress: bool = True,
        keep_archive: bool = True,
    ) -> Path:
        """Download, verify and extract into `root`; return `root/inaturalist_12K`. A second
        call finds the extracted folder and does nothing. `url` defaults to `URL` (a mirror or
        a `file://` path works too)."""
        root = Path(root).expanduser()
        folder = root / cls.FOLDER
        if (root / _DONE_MARKER).is_file() and folder.is_dir():
            return folder
        archive = download_file(
            url or cls.URL, root / cls.ARCHIVE,
            expected_size=expected_size, sha256=sha256, progress=progress,
        )
        return cls.extract(archive, root, keep_archive=keep_archive)

    @classmethod
    def extract(cls, archive: Path | str, root: Path | str, *, keep_archive: bool = True) -> Path:
        """Check the layout of a local `nature_12K.zip`, extract it safely into `root`."""
        archive, root = Path(archive).expanduser(), Path(root).expanduser()
        cls.check_layout(archive)
        safe_extract(archive, root)
        if not keep_archive:
            archive.unlink()
        return root / cls.FOLDER

    @classmethod
    def check_layout(cls, archive: Path) -> None:
        """DataError unless the zip holds inaturalist_12K/train/<class>/ and …/val/<class>/."""
        names = [i.filename for i in zip_members(archive)]
        for split in ("train", "val"):
            prefix = f"{cls.FOLDER}/{split}/"
            found = {n[len(prefix):].split("/")[0] for n in names if n.startswith(prefix)} - {""}
            if not found:
                raise DataError(
                    f"{archive} has no '{prefix}' folder, so it is not the iNaturalist 12K "
                    f"archive (top-level entries: {sorted({n.split('/')[0] for n in names})[:5]})."
                    " Fix: pass the right archive, or use ImageFolderData for other trees."
                )
