"""Pick fp32, bf16 or fp16 per model and device, because bf16 is not always faster.

CUDA: bf16 where the card computes it natively (compute capability >= 8.0, Ampere on), else
fp16 autocast with a gradient scaler — `torch.cuda.is_bf16_supported()` also says yes on
older cards that only emulate bf16, slowly.

On CPUs with native bf16 (AVX512-BF16 / AMX) ResNet50 trains ~3x faster under bf16 autocast
with channels_last, but EfficientNet-Lite0's depthwise convolutions gain nothing, so "auto"
times a few real train steps of the actual model in both precisions and keeps the faster one.
The verdict is kept per (model structure, device, input shape, trainable parameters): what is
frozen changes how much of the step bf16 can speed up.

A timed choice changes the arithmetic (bf16 rounds; NHWC and NCHW kernels sum in other
orders), and timings are noisy: two runs probing for themselves could choose differently and
train to different weights from one seed. So every verdict is decided once per machine and
stored (`VerdictStore`, a JSON file under the cache root, `$FINETUNE_CACHE`): later fits in this
process and later processes on this machine take it, and the first decision wins when several
processes probe at once. Delete the file to probe again; pin a choice with
`TrainConfig(precision=..., channels_last=...)` (`--precision`, `--channels-last`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.atomic import atomic_write_json
from finetune.data.resized import default_cache_root

try:  # an advisory lock makes "the first verdict wins" hold across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: last writer wins, still one verdict a run
    fcntl = None  # type: ignore[assignment]

# bf16 must beat fp32 by this factor to be chosen: a tie is not worth the lower precision.
MIN_SPEEDUP = 1.15
# channels_last must beat NCHW by this factor: either layout is fine when they tie.
MIN_LAYOUT_SPEEDUP = 1.05
_CACHE: dict[tuple[str, str, tuple[int, ...], bool], str] = {}
_LAYOUTS: dict[tuple[str, str, tuple[int, ...], str], bool] = {}
CPUINFO = Path("/proc/cpuinfo")
VERDICT_FILE = "verdicts.json"
# what a stored verdict may be, per kind: an edited or foreign file is decided again
VALID_VERDICTS: dict[str, Callable[[Any], bool]] = {
    "precision": lambda value: value in ("fp32", "bf16", "fp16"),
    "channels_last": lambda value: isinstance(value, bool),
}


# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that include bf16 instructions;
# "ALL"/"DEFAULT" mean no limit. Anything else (SSE41, AVX2*, AVX512_CORE, _VNNI) caps oneDNN
# below bf16, so bf16 convolutions are emulated even on a CPU that has the instructions.
_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
              "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
              "AVX10_2_512", "AVX10_2_512_AMX_2")


def onednn_isa_allows_bf16(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the oneDNN ISA cap in the environment, if any, still lets bf16 run natively
    (`ONEDNN_MAX_CPU_ISA=AVX2` emulates a CPU without bf16 on one with it)."""
    cap = onednn_isa_cap(environ)
    return cap is None or cap.upper() in _BF16_ISAS


def onednn_isa_cap(environ: Mapping[str, str] | None = None) -> str | None:
    """The oneDNN ISA cap set in the environment (ONEDNN_MAX_CPU_ISA, or its older name
    DNNL_MAX_CPU_ISA), or None."""
    environ = os.environ if environ is None else environ
    cap = environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip() if cap and cap.strip() else None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it;
    without it, bf16 autocast is emulated and many times slower than fp32."""
    if not onednn_isa_allows_bf16():
        return False
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


# the first CUDA compute capability with native bf16 tensor cores (A100, Ampere)
NATIVE_BF16_CAPABILITY = (8, 0)


def cuda_precision(capability: tuple[int, int]) -> str:
    """"auto" precision for a CUDA card of compute `capability` (major, minor): bf16 where
    it is native (>= 8.0: A100, RTX 30xx, L4, H100), else fp16 with a gradient scaler (T4 7.5,
    V100 7.0, P100 6.0), which those cards run on their fp16 units."""
    return "bf16" if tuple(capability) >= NATIVE_BF16_CAPABILITY else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` ("bf16", "fp16" or "fp32") on `device`."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def uses_convolutions(model: nn.Module) -> bool:
    """channels_last helps conv nets (oneDNN / cuDNN NHWC kernels) and nothing else."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def train_step_seconds(
    model: nn.Module,
    images: torch.Tensor,
    precision: str,
    channels_last: bool,
    steps: int = 2,
    warmup: int = 1,
    fastest: bool = False,
) -> float:
    """Median (or with `fastest`, least: robust to a busy machine) wall time of forward +
    cross-entropy + backward on a copy of `model` (the original's weights, BatchNorm
    statistics and gradients are untouched)."""
    (times,) = _step_times(model, images, [(precision, channels_last)], steps, warmup)
    return min(times) if fastest else sorted(times)[len(times) // 2]


def least_step_seconds(
    model: nn.Module,
    images: torch.Tensor,
    variants: Sequence[tuple[str, bool]],
    steps: int = 2,
    warmup: int = 1,
) -> list[float]:
    """The least train-step time of each (precision, channels_last) variant, timed in turns
    (one step of each, then the next round): a load that rises or falls during the probe
    weighs on every variant alike, and noise only ever adds time, so the least is the
    fairest of the few steps a probe can afford."""
    return [min(times) for times in _step_times(model, images, variants, steps, warmup)]


def _step_times(model: nn.Module, images: torch.Tensor, variants: Sequence[tuple[str, bool]],
                steps: int, warmup: int) -> list[list[float]]:
    copies = []
    for _, channels_last in variants:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        probe = copy.deepcopy(model).train().to(images.device, memory_format=memory_format)
        copies.append((probe, images.contiguous(memory_format=memory_format)))
    times: list[list[float]] = [[] for _ in variants]
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    with torch.random.fork_rng(devices=[]):
        for step in range(warmup + steps):
            for (precision, _), (probe, batch), timed in zip(variants, copies, times,
                                                               strict=True):
                start = time.perf_counter()
                with autocast(images.device, precision):
                    logits = probe(batch)
                nn.functional.cross_entropy(logits.float(), labels).backward()
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
                if step >= warmup:
                    timed.append(time.perf_counter() - start)
                probe.zero_grad(set_to_none=True)
    return times


def probe_precision(
    model: nn.Module, images: torch.Tensor, channels_last: bool, steps: int = 2
) -> tuple[str, dict[str, float]]:
    """Time fp32 and bf16 train steps in turns; return the faster one (bf16 only if it is
    ≥ MIN_SPEEDUP faster by least step time)."""
    fp32, bf16 = least_step_seconds(model, images, [("fp32", channels_last),
                                                    ("bf16", channels_last)], steps)
    seconds = {"fp32": fp32, "bf16": bf16}
    choice = "bf16" if seconds["fp32"] >= MIN_SPEEDUP * seconds["bf16"] else "fp32"
    return choice, seconds


def resolve_precision(
    requested: str,
    model: nn.Module,
    device: torch.device,
    sample_shape: tuple[int, ...],
    channels_last: bool,
    probe_batch: int = 8,
    probe: bool = True,
) -> str:
    """Turn "auto" into "fp32", "bf16" or "fp16" for this model on this device.

    CUDA: `cuda_precision` of the card's compute capability (never fp32). CPU (never fp16):
    fp32 without native bf16; with it, a short timed probe on a batch of `probe_batch` random
    images of `sample_shape` (C, H, W). The verdict is kept per model structure
    (`model_signature`), device and input shape. `probe=False` (evaluation) reuses a verdict
    but never times training steps: fp32 without one.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return cuda_precision(torch.cuda.get_device_capability(device))
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "fp32"
    key = (model_signature(model), str(device), tuple(sample_shape), channels_last)

    def timed() -> str:
        images = _probe_images(probe_batch, sample_shape, device)
        return probe_precision(model, images, channels_last)[0]

    return _decided(_CACHE, "precision", key, timed if probe else None, "fp32")


def model_signature(model: nn.Module, trainable: bool = True) -> str:
    """What makes two models time alike: their classes, parameter names, shapes and (with
    `trainable`) which train — not their display name (two `Backbone.from_module(...,
    name="custom")` differ)."""
    digest = hashlib.sha1()
    for module_name, module in model.named_modules():
        digest.update(f"{module_name}:{type(module).__qualname__};".encode())
    for name, parameter in model.named_parameters():
        flag = parameter.requires_grad if trainable else ""
        digest.update(f"{name}{tuple(parameter.shape)}{flag};".encode())
    return digest.hexdigest()


def resolve_channels_last(
    requested: str | bool,
    model: nn.Module,
    device: torch.device,
    sample_shape: tuple[int, ...],
    precision: str,
    probe: bool = True,
    probe_batch: int = 2,
) -> bool:
    """Turn channels_last="auto" into True or False for this model, device and precision.

    Only conv nets can gain from NHWC, and not all of them on every CPU (depthwise
    convolutions, AVX2-only oneDNN kernels), so "auto" times train steps in both layouts in
    turns on copies of the model (least of two after a warm-up) and keeps channels_last only
    if it is at least MIN_LAYOUT_SPEEDUP faster. The verdict is kept per model structure
    (`model_signature` without what trains), device, input shape and precision, so runs in
    one process compute alike. `probe=False` (evaluation) reuses a verdict, else takes NHWC
    for conv nets."""
    if requested != "auto":
        return bool(requested)
    if not uses_convolutions(model) or len(sample_shape) != 3:
        return False
    # by structure alone: a resume into a later phase of a schedule keeps the first verdict
    key = (model_signature(model, trainable=False), str(device), tuple(sample_shape), precision)

    def timed() -> bool:
        images = _probe_images(probe_batch, sample_shape, device)
        nchw, nhwc = least_step_seconds(model, images, [(precision, False), (precision, True)])
        return nchw >= MIN_LAYOUT_SPEEDUP * nhwc

    return _decided(_LAYOUTS, "channels_last", key, timed if probe else None, True)


def _decided(memo: dict[Any, Any], kind: str, key: tuple, probe: Callable[[], Any] | None,
             default: Any) -> Any:
    """The verdict for `key`: this process's, else this machine's stored one, else what
    `probe()` finds (then stored); `default`, kept nowhere, when there is none and no probe
    may run."""
    if key not in memo:
        verdict = VerdictStore().decide(kind, key, probe)
        if verdict is None:
            return default
        memo[key] = verdict
    return memo[key]


def _probe_images(batch: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The same random images for every probe (a generator of its own: no global RNG)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator).to(device)


def machine_signature() -> str:
    """What makes two processes time alike: the CPU (model and flags), the oneDNN and ATen
    ISA caps, torch's version, the CUDA cards — and the thread count now (a comparison's
    runs side by side train on fewer threads than one alone)."""
    parts = [_hardware(), torch.__version__, str(torch.get_num_threads()),
             str(onednn_isa_cap()), os.environ.get("ATEN_CPU_CAPABILITY", "")]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _hardware() -> str:
    try:
        info = CPUINFO.read_text().split("\n\n")[0]
        parts = [line for line in info.splitlines()
                 if line.startswith(("model name", "flags", "vendor_id"))]
    except OSError:
        import platform

        parts = [platform.processor()]
    if torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return "\n".join(parts)


class VerdictStore:
    """Timed choices kept per machine in `<cache root>/verdicts.json`: the first process to
    decide a key stores its verdict, and every later fit on this machine takes it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_root() / VERDICT_FILE

    def decide(self, kind: str, key: tuple, probe: Callable[[], Any] | None) -> Any:
        """The stored verdict for (`kind`, `key`) on this machine; else `probe()`'s, stored
        (unless another process stored one meanwhile, which wins); None without a probe.
        A cache root that cannot be written keeps the verdict for this process only."""
        name = hashlib.sha1(repr((kind, machine_signature(), key)).encode()).hexdigest()[:24]
        stored = self._read().get(name)
        if stored is not None and not VALID_VERDICTS.get(kind, lambda _: True)(stored):
            warnings.warn(f"{self.path}: the stored {kind} verdict {stored!r} is not one this "
                          "version makes; deciding again (delete the file to forget the others)",
                          RuntimeWarning, stacklevel=2)
            stored = None
        if stored is not None or probe is None:
            return stored
        verdict = probe()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(VERDICT_FILE + ".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                verdicts = self._read()
                if not VALID_VERDICTS.get(kind, lambda _: True)(verdicts.get(name)):
                    verdicts.pop(name, None)  # an invalid one is replaced, not kept
                verdicts.setdefault(name, verdict)
                atomic_write_json(self.path, verdicts, indent=1)
                return verdicts[name]
        except OSError:
            return verdict

    def _read(self) -> dict[str, Any]:
        try:
            verdicts = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return verdicts if isinstance(verdicts, dict) else {}


def machine() -> dict[str, Any]:
    """The CPU (model, threads, the flags that decide precision) and GPU a figure was
    measured on: every timing this project reports names it."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        flags, model = set(), platform.processor()
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "native_bf16": cpu_has_native_bf16(),
        "isa_cap": onednn_isa_cap(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
