"""`PeakMemory`: the peak memory of a block of code, on CUDA or from the process's RSS."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import torch

from finetune.runtime.memory import trim_heap


class PeakMemory:
    """Peak memory of the code inside the `with`, in MiB, and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only). CPU: the peak resident set size of
    this process above its RSS at entry — Linux's VmHWM, reset via /proc/self/clear_refs; else
    psutil polled every 20 ms. Freed heap is handed back first (malloc_trim) so one run's
    leftovers do not hide the next one's growth. Data-loader worker processes are not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib, self.method = device, float("nan"), "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = self._base = 0

    def __enter__(self) -> PeakMemory:
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
