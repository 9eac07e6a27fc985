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

`PeakMemory` measures how far memory rose during a block of code (compare's rows, the
advisor's depths).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import threading
from pathlib import Path
from typing import Any

import torch

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


class PeakMemory:
    """Peak memory of the code inside the `with`, in MiB, and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only). CPU: the peak resident set size of
    this process above its RSS at entry — Linux's VmHWM, reset via /proc/self/clear_refs; else
    psutil polled every 20 ms. Freed heap is handed back first (malloc_trim) so one run's
    leftovers do not hide the next one's growth. Data-loader worker processes are not counted.
    """

    def __init__(self, device: torch.device, collect: bool = True) -> None:
        """`collect=False` skips the garbage collection on entry (a quarter of a second in a
        process holding many objects), for many short measurements in a row."""
        self.device, self.mib, self.method = device, float("nan"), "none"
        self.collect = collect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.method = torch.cuda.memory_allocated(self.device), "cuda allocated"
            return self
        trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._base, self.method = _proc_status_kib("VmRSS") * 1024, "rss (VmHWM)"
        except OSError:
            import psutil

            process = psutil.Process()
            self._base = self._peak = process.memory_info().rss
            self.method = "rss (psutil poll)"
            self._thread = threading.Thread(target=self._poll, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _poll(self, process: Any) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.mib = (peak - self._base) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
