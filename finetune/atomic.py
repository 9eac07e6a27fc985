"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half;
and an advisory lock for work that two processes must not do at once.

Everything is written to a temporary file in the target's folder and renamed onto it; a
failure removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any],
                 durable: bool = False) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it onto `path`.

    `durable=True` also fsyncs the file and the folder, so the new content survives a power
    loss (checkpoints); caches that can be rebuilt skip that cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` as UTF-8, written atomically."""
    return atomic_write(path, lambda file: file.write(text.encode()))


def remove_orphaned_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_write(path, ...)` leaves when its process is killed
    mid-write (a checkpoint's can take hundreds of MB); returns what it removed. Call it only
    where no other process writes `path` at the same time."""
    path = Path(path)
    orphans = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def atomic_write_json(path: str | Path, data: Any, indent: int | None = None) -> Path:
    """`data` as JSON (UTF-8, trailing newline), written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockBusyError(BlockingIOError):
    """`exclusive_lock(..., wait=False)` found the lock held by someone else."""


@contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an advisory lock on the file `path` (created if missing) for the `with` block.

    Other processes (and other open files in this one) asking for it wait, or with
    `wait=False` get a `LockBusyError` whose message is `busy`. The lock goes with the
    process: a killed holder never leaves a stale lock behind, unlike a marker file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:  # POSIX; elsewhere runs are not serialised
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LockBusyError(busy or f"{path} is locked by another process") from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
