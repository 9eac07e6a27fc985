"""Keep freed memory for reuse: glibc's default returns large blocks to the kernel.

A training step allocates and frees the same large activation and gradient buffers every
step. glibc's malloc serves them with mmap and unmaps them on free, so every step faults every
page in again; measured here on ResNet50 that was ~300k minor page faults and ~20% of a
bf16 step (docs/performance.md, `python -m benchmarks.allocator`). `keep_freed_memory()`
tells glibc, at run time, to serve them from the heap and not to trim it — the process keeps
its peak size, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Configure glibc malloc to reuse freed memory; True if applied (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_MAX, 0),            # no mmap for big blocks: they come from the heap
        (M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap's top back to the kernel
        (M_TOP_PAD, 256 << 20),     # grow the heap in big steps
    ))
