"""benchmarks.throughput runs end to end on a small model and reports every strategy."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import throughput
from finetune.runtime.precision import cpu_has_native_bf16


def test_throughput_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "throughput.json"
    results = throughput.main([
        "--backbone", "resnet18", "--strategies", "last-layer,freeze-80", "full-unfreeze",
        "--images", "8", "--batch-size", "4", "--image-size", "32", "--epochs", "2",
        "--precision", "fp32", "--out", str(out),
    ])
    rows = {row["strategy"]: row for row in results["rows"]}
    assert set(rows) == {"last-layer", "freeze-80", "full-unfreeze"}
    assert rows["last-layer"]["library"]["cached_at"] == "avgpool"
    assert rows["freeze-80"]["library"]["cached_at"].startswith("layer")
    assert rows["full-unfreeze"]["library"]["cached_at"] is None
    for row in rows.values():
        naive, library = row["naive"]["images_per_s"], row["library"]
        assert row["ratio_first"] == pytest.approx(library["first_images_per_s"] / naive)
        assert row["ratio_later"] == pytest.approx(library["later_images_per_s"] / naive)
        naive_cpu = row["naive"]["images_per_cpu_s"]
        later_cpu = library["later_images_per_cpu_s"]
        assert row["cpu_ratio_later"] == pytest.approx(later_cpu / naive_cpu)
        assert 0 < library["first_images_per_cpu_s"] < float("inf")
    written = json.loads(out.read_text())
    assert written["machine"]["threads"] == torch.get_num_threads()
    assert [row["strategy"] for row in written["rows"]] == list(rows)
    printed = capsys.readouterr().out
    assert printed.count("| last-layer |") == 1 and "ratio epoch 2+" in printed
    kind = "with native bf16" if cpu_has_native_bf16() else "without native bf16"
    assert f"CPU {kind}" in printed.splitlines()[0]


def test_throughput_takes_lite0_and_rejects_unknown_strategies_clearly() -> None:
    args = throughput.parse_args(["--backbone", "lite0", "--strategies", "last-layer,freeze-80"])
    assert args.strategies == ["last-layer", "freeze-80"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--strategies", "last-layer,nope"])
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional [lite] extra")
    assert throughput.make_backbone("efficientnet_lite0", 3).name == "efficientnet_lite0"


def test_throughput_needs_two_epochs() -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--epochs", "1"])


@pytest.mark.slow
def test_allocator_benchmark_reports_each_setting(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import allocator

    rows = allocator.main(["--backbone", "resnet18", "--steps", "1", "--batch-size", "2",
                           "--image-size", "32", "--precision", "fp32"])
    assert [row["allocator"] for row in rows][:3] == [
        "glibc default", "glibc, environment", "glibc, keep_freed_memory()"]
    assert rows[1]["env"]["MALLOC_MMAP_MAX_"] == "0"
    assert rows[2]["env"] == {allocator.RUNTIME_FLAG: "1"}
    assert "| glibc default |" in capsys.readouterr().out


def test_cpu_kind_names_the_isa_cap_that_hides_bf16() -> None:
    capped = {"native_bf16": False, "isa_cap": "AVX2", "flags": ["avx2", "avx512_bf16"]}
    assert "limited by ONEDNN_MAX_CPU_ISA=AVX2" in throughput.cpu_kind(capped)
    plain = {"native_bf16": False, "isa_cap": None, "flags": ["avx2"]}
    assert throughput.cpu_kind(plain).startswith("CPU without native bf16 (bf16 emulated")
    assert throughput.cpu_kind({**capped, "native_bf16": True}) == "CPU with native bf16"
