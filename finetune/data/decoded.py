"""Decoded images kept in memory, for images that come out the same every time.

An un-augmented image (validation, test, or training without augmentation) is the same
tensor in every epoch, yet a streaming loader decodes, resizes and crops it again each time —
and on a 2-core CPU the loader worker that does so takes a core from the model. `DecodedImages`
decodes each such image once (all of a dataset's images at its first use, in threads: PIL
releases the GIL) and keeps its cropped uint8 pixels; a loader over them needs no worker
processes. Normalising stays per batch, with the same arithmetic as the streaming path, so
the tensors are bit-identical. One store can serve several `ImageFolderData` (a comparison's
runs share one split), up to a byte budget past which datasets stream as before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_BUDGET_CAP = 2 * 1024**3  # at most 2 GiB of pixels by default...
RAM_FRACTION = 8  # ...and at most an eighth of the machine's memory

Decoder = Callable[[Path], np.ndarray]
ImageFile = tuple[Path, str]  # a path and the content key of its bytes (`file_key`)


def physical_memory() -> int | None:
    """The machine's RAM in bytes, where the OS says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_budget() -> int:
    """min(2 GiB, RAM / 8): holds a 224 px un-augmented iNaturalist 12K train split (1.5 GB)
    on a 24 GiB machine, and never a large share of a small one."""
    ram = physical_memory()
    if ram is None:
        return DEFAULT_BUDGET_CAP // 4
    return min(DEFAULT_BUDGET_CAP, ram // RAM_FRACTION)


class DecodedImages:
    """Cropped uint8 pixels (or the decode error) per (file, transform), up to `budget_bytes`;
    a file is a path with the content key of its bytes, so a rewritten image is decoded anew.

    `admit` reserves room for a dataset's images before its loader is built: a dataset that
    does not fit is never admitted and streams. `pixels` decodes every missing image of the
    dataset at once, in `threads` threads, on its first call."""

    def __init__(self, budget_bytes: int | None = None, threads: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = default_budget() if budget_bytes is None else budget_bytes
        self.threads = threads or os.cpu_count() or 1
        # (path, transform key) -> (the file's content key when decoded, pixels or error)
        self._entries: dict[tuple[str, Hashable], tuple[str, np.ndarray | Exception]] = {}
        self._reserved: dict[tuple[str, Hashable], int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Picklable for loader workers started by spawn (a lock is not)."""
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, paths: Sequence[Path], key: Hashable, image_bytes: int) -> bool:
        """Reserve `image_bytes` for each of `paths` decoded with `key`; False (nothing
        reserved) if they do not fit in what is left of the budget."""
        new = {(str(path), key) for path in paths} - self._reserved.keys()
        if self.reserved_bytes + len(new) * image_bytes > self.budget_bytes:
            return False
        self._reserved.update(dict.fromkeys(new, image_bytes))
        return True

    def pixels(self, file: ImageFile, key: Hashable, dataset_files: Sequence[ImageFile],
               decode: Decoder) -> np.ndarray:
        """The pixels of `file` (a path and its content key, `finetune.data.images.file_key`);
        on a miss, first decodes every missing one of `dataset_files`. An entry whose file's
        bytes changed since it was decoded is a miss. Raises the decode error of a file that
        cannot be read (every time it is asked)."""
        entry = self._lookup(file, key)
        if entry is None:
            self._fill(dataset_files, key, decode)
            entry = self._lookup(file, key)
            if entry is None:  # not among dataset_files
                entry = _decoded_or_error(decode, file[0])
                self._entries[(str(file[0]), key)] = (file[1], entry)
        if isinstance(entry, Exception):
            raise entry
        return entry

    def _lookup(self, file: ImageFile, key: Hashable) -> np.ndarray | Exception | None:
        content, entry = self._entries.get((str(file[0]), key), (None, None))
        return entry if content == file[1] else None

    def _fill(self, files: Sequence[ImageFile], key: Hashable, decode: Decoder) -> None:
        with self._lock:
            missing = list(dict.fromkeys(f for f in files if self._lookup(f, key) is None))
            if not missing:
                return
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                decoded = list(pool.map(lambda f: _decoded_or_error(decode, f[0]), missing,
                                        chunksize=16))
            self._entries.update({(str(path), key): (content, entry) for (path, content), entry
                                  in zip(missing, decoded, strict=True)})


def _decoded_or_error(decode: Decoder, path: Path) -> np.ndarray | Exception:
    try:
        return decode(path)
    except Exception as error:  # PIL raises many types for bad files; re-raised on use
        return error
