"""benchmarks.recipes: the long-tailed copy it measures class balance on, and the paired table
it builds from comparisons' results (the comparisons themselves are tested in test_compare)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.recipes import compare_recipes, long_tailed_copy, markdown
from tests.conftest import write_image


def test_the_long_tailed_copy_keeps_a_falling_share_of_each_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        for i in range(25):
            write_image(root / "train" / name / f"{i:02d}.png")
        for i in range(3):
            write_image(root / "val" / name / f"t{i}.png")
    copy = long_tailed_copy(root, tmp_path / "tail", rarest=0.2)
    kept = {name: len(list((copy / "train" / name).iterdir())) for name in ("a", "b", "c")}
    # of the first 20: 20 * 0.2^0, 20 * 0.2^0.5 = 8.9 -> 9, 20 * 0.2 = 4
    assert kept == {"a": 20, "b": 9, "c": 4}
    assert all(p.is_symlink() for p in (copy / "train" / "a").iterdir())
    assert all(len(list((copy / "test" / n).iterdir())) == 3 for n in ("a", "b", "c"))


def _results(folder: Path, accuracy_runs: list[list[int]], targets: list[int],
             seconds: float) -> Path:
    rows = [{"strategy": "last-layer", "seed": seed, "test_predictions": predictions,
             "test_accuracy": sum(p == t for p, t in zip(predictions, targets, strict=True))
             / len(targets), "seconds_per_epoch": seconds, "epochs": 2, "lr": 1e-3,
             "tuning": None, "train_uncached_reason": None}
            for seed, predictions in enumerate(accuracy_runs)]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows, "test_targets": targets}))
    return folder


def test_the_table_pairs_each_recipe_with_the_baseline(tmp_path: Path) -> None:
    targets = [0, 1] * 20
    base = _results(tmp_path / "base", [targets[:30] + [1 - t for t in targets[30:]]] * 2,
                    targets, seconds=2.0)  # 75% correct
    better = _results(tmp_path / "better", [targets[:36] + [1 - t for t in targets[36:]]] * 2,
                      targets, seconds=3.0)  # 90% correct
    table = compare_recipes({"baseline": base, "better": better}, "baseline", ["last-layer"])
    row = next(r for r in table if r["recipe"] == "better")
    assert row["test_accuracy"] == pytest.approx(90.0)
    assert row["difference"] == pytest.approx(15.0)
    low, high = row["difference_ci95"]
    assert 0 < low < 15 < high
    assert row["time_ratio"] == pytest.approx(1.5)
    text = markdown(table, ["last-layer"], "title")
    assert "| baseline | 75.0 ± 0.0 |" in text
    assert "| better | 90.0 (**+15.0** [" in text and "×1.5 |" in text
