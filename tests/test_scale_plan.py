"""benchmarks.scale_plan: the cut and activation size per depth, measured costs multiplied out
for the target (one cache per machine, RAM or disk)."""

from __future__ import annotations

import pytest

from benchmarks import scale_plan
from tests.conftest import TINY


def test_the_plan_sizes_each_depths_cache_and_scales_the_measured_costs(tmp_path):
    args = scale_plan.arguments([
        "--backbone", TINY, "--classes", "3", "--image-size", "32", "--batch-size", "4",
        "--rounds", "1", "--images", "1000000", "--val-images", "0", "--nodes", "2",
        "--gpus-per-node", "4", "--node-ram-gb", "0.1", "--out", str(tmp_path)])
    rows = scale_plan.measure_depths(args)
    assert [r["depth"] for r in rows] == ["none", "stem", "block1", "block2"]
    assert rows[0]["cut"] is None and rows[0]["uncached_reason"]  # nothing frozen: no cache
    stem = rows[1]
    # TinyNet's stem: 8 channels at 16x16 from a 32 px image (a stride-2 convolution)
    assert stem["bytes_fp32"] == 8 * 16 * 16 * 4 == 2 * stem["bytes_bf16"]
    assert all(r["full_step_s"] > 0 for r in rows)
    assert all(r["prefix_s"] > 0 and r["cached_step_s"] > 0 for r in rows[1:])
    entries = scale_plan.plan(rows, args)
    assert entries[1]["cache_per_node_gb"] == pytest.approx(1e6 * stem["bytes_bf16"] / 1e9)
    assert entries[1]["cache_where"].startswith("local disk")  # 1 GB over half of 0.1 GB
    assert entries[1]["cached_epoch_h"] == pytest.approx(
        1e6 * stem["cached_step_s"] / 8 / 3600)
    scale_plan.main([*[str(a) for a in (
        "--backbone", TINY, "--classes", 3, "--image-size", 32, "--batch-size", 2, "--rounds",
        1, "--out", tmp_path)]])
    text = (tmp_path / "scale_plan.md").read_text()
    assert "| stem |" in text and "Command: `python -m benchmarks.scale_plan" in text
