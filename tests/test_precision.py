"""CPU kind detection: a oneDNN ISA cap below bf16 makes a bf16 CPU one without native bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from finetune.runtime import precision as precision_module

BF16_FLAGS = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
AVX2_FLAGS = "flags\t\t: fpu sse avx2 fma\n"


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Set /proc/cpuinfo's flags and the oneDNN ISA cap; the cached answer is recomputed."""

    def configure(flags: str, cap: str | None = None, name: str = "ONEDNN_MAX_CPU_ISA") -> bool:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(flags)
        monkeypatch.setattr(precision_module, "CPUINFO", cpuinfo)
        for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(variable, raising=False)
        if cap is not None:
            monkeypatch.setenv(name, cap)
        precision_module.cpu_has_native_bf16.cache_clear()
        return precision_module.cpu_has_native_bf16()

    yield configure
    precision_module.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("cap", "native"), [
    (None, True), ("ALL", True), ("default", True), ("AVX512_CORE_BF16", True),
    ("avx512_core_amx", True), ("AVX2", False), ("avx2", False), ("AVX512_CORE", False),
    ("AVX512_CORE_VNNI", False), ("SSE41", False), ("AVX2_VNNI", False)])
def test_a_onednn_cap_below_bf16_means_no_native_bf16(cpu, cap: str | None, native: bool) -> None:
    assert cpu(BF16_FLAGS, cap) is native


def test_the_older_dnnl_name_of_the_cap_counts_too(cpu) -> None:
    assert cpu(BF16_FLAGS, "AVX2", name="DNNL_MAX_CPU_ISA") is False


def test_no_cap_lifts_a_cpu_without_the_instructions(cpu) -> None:
    assert cpu(AVX2_FLAGS) is False
    assert cpu(AVX2_FLAGS, "ALL") is False


def test_auto_precision_never_times_emulated_bf16(cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a bf16 CPU capped to AVX2 a bf16 step is ~13x slower than fp32: "auto" must not
    spend a probe on it."""
    import torch

    assert cpu(BF16_FLAGS, "AVX2") is False

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("timed bf16 on a CPU without native bf16")

    monkeypatch.setattr(precision_module, "probe_precision", no_probe)
    monkeypatch.setattr(precision_module, "_CACHE", {})
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    verdict = precision_module.resolve_precision("auto", model, torch.device("cpu"), (3, 8, 8),
                                                 channels_last=True)
    assert verdict == "fp32"


def test_variants_are_timed_in_turns_on_copies() -> None:
    """One step of each variant per round, so a load change during the probe hits all alike."""
    import torch

    order: list[str] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append("nhwc" if x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else "nchw")
            return self.conv(x).mean((2, 3))

    model = Recorder()
    before = model.conv.weight.detach().clone()
    seconds = precision_module.least_step_seconds(
        model, torch.randn(2, 3, 8, 8), [("fp32", False), ("fp32", True)], steps=2, warmup=1)
    assert order == ["nchw", "nhwc"] * 3 and len(seconds) == 2 and min(seconds) > 0
    assert torch.equal(model.conv.weight, before) and model.conv.weight.grad is None
