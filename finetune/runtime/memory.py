"""Keep freed memory for reuse: glibc's default returns large blocks to the kernel.

A training step allocates and frees the same large activation and gradient buffers every
step. glibc's malloc serves them with mmap and unmaps them on free, so every step faults every
page in again; measured here on ResNet50 that was ~300k minor page faults and ~20% of a
bf16 step (docs/performance.md, `python -m benchmarks.allocator`). `keep_freed_memory()`
tells glibc, at run time, to serve them from the heap and not to trim it — the process keeps
its peak size, which a training process reaches anyway.

It is process-wide, so the Trainer scopes it to `fit` (`TrainConfig.keep_freed_memory`, and
`TrainState.malloc_tuned` says whether it was applied): when fit returns,
`restore_malloc_defaults()` puts glibc's default limits back and hands the freed heap to the
kernel. One thing cannot be undone by `mallopt`: glibc no longer raises its mmap threshold
dynamically, so it stays at the default 128 KiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

# mallopt parameters from glibc's <malloc.h>, and glibc's defaults for them
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
GLIBC_DEFAULTS = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024), (M_TOP_PAD, 0))


def _libc() -> Any | None:
    """glibc with `mallopt` typed, or None (not Linux, or a libc without mallopt: musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Configure glibc malloc to reuse freed memory, process-wide; True if applied."""
    libc = _libc()
    return libc is not None and all(libc.mallopt(option, value) == 1 for option, value in (
        (M_MMAP_MAX, 0),            # no mmap for big blocks: they come from the heap
        (M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap's top back to the kernel
        (M_TOP_PAD, 256 << 20),     # grow the heap in big steps
    ))


def trim_heap() -> bool:
    """Hand the free memory at the top of glibc's heap back to the kernel; True if done."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def restore_malloc_defaults() -> bool:
    """Undo `keep_freed_memory` (glibc's default limits) and return free heap to the kernel."""
    libc = _libc()
    if libc is None:
        return False
    restored = all(libc.mallopt(option, value) == 1 for option, value in GLIBC_DEFAULTS)
    libc.malloc_trim(0)
    return restored
