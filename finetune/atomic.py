"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half;
and an advisory lock for work that two processes must not do at once.

Everything is written to a temporary file in the target's folder and renamed onto it; a
failure removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from finetune.errors import DiskFullError

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
        os.fchmod(handle, 0o666 & ~current_umask())  # as open() would create it, not 0600
        with os.fdopen(handle, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save wraps a failed write
        written = _size(temporary)
        Path(temporary).unlink(missing_ok=True)
        if out_of_space(error):
            raise disk_full(path, written) from None
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)
    return path


def disk_full(path: Path, needed: int) -> DiskFullError:
    """The one-line error for a write that ran out of space: which file, how much it needed,
    what is free, and where to go instead."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return DiskFullError(
        f"no space left to write {path}: it needed more than {needed / 2**20:.1f} MiB and "
        f"{free / 2**20:.1f} MiB are free on that disk; nothing partial was kept. Free some "
        "space, or write elsewhere: --checkpoint-dir / --output for runs, FINETUNE_CACHE or "
        "--cache-dir for caches, TrainConfig(activation_cache_dir=...) for spilled activations."
    )


def out_of_space(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) is a full disk or an exhausted quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


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
