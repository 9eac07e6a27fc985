"""`python -m benchmarks.compare` end to end on a generated image tree and a tiny backbone."""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import compare
from finetune import (
    STRATEGIES,
    Backbone,
    FreezeAllBut,
    FreezeFraction,
    FullUnfreeze,
    LastLayerOnly,
)
from finetune.callbacks import StopFit
from finetune.compare import pool
from finetune.compare import run as compare_run
from finetune.data import INaturalist12K
from finetune.data.sample import SAMPLE_CLASSES
from tests.conftest import make_tiny_backbone

CLASSES = ("cat", "dog", "owl")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ with 4 images per class, val/ with 2: colours differ by class so it is learnable."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (36, 36, 3)) + np.eye(3, dtype=int)[label] * 190
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


class Factory:
    """A tiny backbone for any name; records every call, and can raise on a given call."""

    def __init__(self, fail_on_call: int | None = None, error: BaseException | None = None):
        self.calls: list[tuple[str, int, bool]] = []
        self.fail_on_call, self.error = fail_on_call, error

    def __call__(self, name: str, num_classes: int, pretrained: bool) -> Backbone:
        self.calls.append((name, num_classes, pretrained))
        if self.fail_on_call == len(self.calls) and self.error is not None:
            raise self.error
        return make_tiny_backbone(num_classes=num_classes)


def argv(tree: Path, output: Path, *extra: str) -> list[str]:
    """A comparison of the tiny backbone on `tree`; untuned (`--tune none`) unless `extra`
    names a --tune: a test of anything else does not pay for a learning-rate search."""
    tune = () if "--tune" in extra else ("--tune", "none")
    return ["--data", str(tree), "--backbone", "tiny", "--epochs", "1", "--batch-size", "4",
            "--image-size", "32", "--workers", "0", "--precision", "fp32", "--device", "cpu",
            "--jobs", "1", "--output", str(output), *tune, *extra]


def read_results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def test_default_strategies_write_every_output(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = Factory()
    assert compare.main(argv(tree, tmp_path), backbone_factory=factory) == 0

    results = read_results(tmp_path)
    assert [r["strategy"] for r in results["rows"]] == list(compare.DEFAULT_STRATEGIES)
    assert results["classes"] == list(CLASSES)
    assert results["config"]["epochs"] == 1 and results["config"]["preset"] == "quick"
    scratch = next(r for r in results["rows"] if r["strategy"] == "from-scratch")
    probe = next(r for r in results["rows"] if r["strategy"] == "last-layer")
    assert scratch["pretrained"] is False and probe["pretrained"] is True
    assert ("tiny", 3, False) in factory.calls  # from-scratch asked for random weights
    assert probe["trainable_params"] == 16 * 3 + 3 < probe["total_params"]
    assert scratch["trainable_pct"] == pytest.approx(100.0)
    for row in results["rows"]:
        assert row["train_images"] == 9 and row["val_images"] == 3 and row["test_images"] == 6
        # 2 test images per class: accuracy is the mean of the per-class accuracies, in sixths
        per_class = list(row["per_class_test_accuracy"].values())
        assert row["test_accuracy"] == pytest.approx(sum(per_class) / 3)
        assert (6 * row["test_accuracy"]) == pytest.approx(round(6 * row["test_accuracy"]))
        assert (3 * row["val_accuracy"]) == pytest.approx(round(3 * row["val_accuracy"]))
        # 9 training images in batches of 4: the single-image last batch is dropped
        assert row["history"][0]["train_images"] == 8
        assert row["images_per_second"] == pytest.approx(8 / row["train_seconds_per_epoch"])
        # its error analysis: the 6 test images by loss, the worst first
        folder = tmp_path / "analysis" / f"{row['strategy']}-seed0"
        lines = (folder / "top_losses.csv").read_text().splitlines()[1:]
        assert len(lines) == 6 and float(lines[0].split(",")[5]) == pytest.approx(
            max(row["test_losses"]), rel=1e-5)
        assert (folder / "confusion.png").is_file() and (folder / "top_losses.png").is_file()
        assert row["peak_memory_mib"] == row["peak_memory_mib"]  # measured, not NaN
        assert set(row["per_class_test_accuracy"]) == set(CLASSES)
        predictions = np.array(row["test_predictions"])  # stored: intervals need no retraining
        assert np.mean(predictions == results["test_targets"]) == pytest.approx(
            row["test_accuracy"])
        low, high = row["test_accuracy_ci95"]
        assert 0.0 <= low <= row["test_accuracy"] <= high <= 1.0
        low, high = row["test_macro_f1_ci95"]
        assert 0.0 <= low <= high <= 1.0
    assert sorted(results["test_targets"]) == [0, 0, 1, 1, 2, 2]
    assert len(results["summary"]) == 5 and "test_accuracy_ci95" in results["summary"][0]
    assert len(results["pairwise"]) == 10  # 5 strategies, every pair once
    assert set(results["pairwise"][0]) >= {"a", "b", "difference", "ci95", "p_value",
                                            "significant"}
    assert results["verdict"] and results["best_within_noise"]
    assert (tmp_path / "pairwise.md").read_text().startswith("| a | b | a − b (points)")
    assert (tmp_path / "pairwise.csv").read_text().count("\n") == 11

    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy"] for r in rows] == list(compare.DEFAULT_STRATEGIES)
    assert {"seed", "trainable_params", "test_accuracy", "config.lr", "config.backbone"} <= set(
        rows[0])

    table = (tmp_path / "results.md").read_text()
    for name in compare.DEFAULT_STRATEGIES:
        assert f"| {name} |" in table
    assert "| strategy | lr | trainable params | val acc (%) | test acc (%)" in table
    assert "| 95% CI | runs |" in table and results["verdict"] in table
    out = capsys.readouterr().out
    assert "| strategy | lr | trainable params" in out and results["verdict"] in out

    with open(tmp_path / "per_class.csv") as handle:
        per_class = list(csv.reader(handle))
    assert per_class[0] == ["strategy", *CLASSES] and len(per_class) == 6
    for name in ("accuracy.png", "accuracy_vs_time.png", "per_class_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_seeds_give_mean_and_std(tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "last-layer", "--seeds", "2")
    assert compare.main(args, backbone_factory=Factory()) == 0
    rows = read_results(tmp_path)["rows"]
    assert [(r["strategy"], r["seed"]) for r in rows] == [("last-layer", 0), ("last-layer", 1)]
    assert "±" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_builds_and_applies(name: str) -> None:
    spec = "freeze-all-but:groups=block2" if name == "freeze-all-but" else name
    run = compare.parse_run(spec)
    strategy = run.strategy
    assert type(strategy) is STRATEGIES[name] and run.pretrained
    backbone = make_tiny_backbone()
    report = strategy.apply(backbone)
    trains = [p for p in backbone.parameters() if p.requires_grad]
    assert report.trainable_params == sum(p.numel() for p in trains) > 0
    assert report.total_params == sum(p.numel() for p in backbone.parameters())
    assert backbone.head.weight.requires_grad or name == "freeze-head-only"


def test_registry_names_aliases_and_options_train_end_to_end(tree: Path, tmp_path: Path) -> None:
    specs = ["lp-ft:probe_epochs=1", "freeze-all-but:groups=block2+stem", "gradual-unfreeze",
             "freeze-fraction:fraction=0.5:count=numel"]
    args = argv(tree, tmp_path, "--strategies", ",".join(specs[:2]), *specs[2:])
    assert compare.main(args, backbone_factory=Factory()) == 0
    rows = read_results(tmp_path)["rows"]
    assert [r["strategy"] for r in rows] == specs
    assert rows[1]["strategy_state"]["options"]["groups"] == ["block2", "stem"]


def test_parse_run_options_weights_and_errors() -> None:
    run = compare.parse_run("freeze-fraction:fraction=0.5:count=numel")
    assert run == compare.RunSpec("freeze-fraction:fraction=0.5:count=numel",
                                  FreezeFraction(0.5, count="numel"), pretrained=True)
    assert compare.parse_run("freeze-80").strategy == FreezeFraction(0.8)
    assert compare.parse_run("freeze-80:count=numel").strategy == FreezeFraction(0.8, "numel")
    assert compare.parse_run("from-scratch") == compare.RunSpec("from-scratch", FullUnfreeze(),
                                                                pretrained=False)
    scratch = compare.parse_run("last-layer:weights=none")
    assert scratch.strategy == LastLayerOnly() and not scratch.pretrained
    assert compare.parse_run("freeze-all-but:groups=layer4+stem").strategy == FreezeAllBut(
        groups=("layer4", "stem"))
    assert compare.parse_run("freeze-all-but:groups=layer4").strategy.groups == ("layer4",)
    with pytest.raises(ValueError, match=r"unknown strategy 'freez-80'.*freeze-80"):
        compare.parse_run("freez-80")
    with pytest.raises(ValueError, match=r"bad option 'depth'.*key=value"):
        compare.parse_run("gradual-unfreeze:depth")
    with pytest.raises(ValueError, match="cannot build strategy 'freeze-fraction:fraction=2'"):
        compare.parse_run("freeze-fraction:fraction=2")
    with pytest.raises(ValueError, match="weights takes none"):
        compare.parse_run("last-layer:weights=imagenet")
    with pytest.raises(SystemExit, match="--strategies: unknown strategy 'nope'"):
        compare.main(["--data", ".", "--strategies", "nope"], backbone_factory=Factory())


def test_failed_strategy_keeps_finished_rows_and_resume_skips_them(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A group the tiny backbone lacks: parses, then fails when the strategy is applied.
    broken = "freeze-all-but:groups=layer4"
    args = argv(tree, tmp_path, "--strategies", f"last-layer,{broken},bitfit")
    assert compare.main(args, backbone_factory=Factory()) == 1
    results = read_results(tmp_path)
    assert [r["strategy"] for r in results["rows"]] == ["last-layer", "bitfit"]
    assert results["failed"][0]["strategy"] == broken and "layer4" in results["failed"][0]["error"]
    assert "| bitfit |" in (tmp_path / "results.md").read_text()

    factory = Factory()
    resumed = argv(tree, tmp_path, "--strategies", "last-layer,bitfit,full-unfreeze", "--resume")
    assert compare.main(resumed, backbone_factory=factory) == 0
    assert factory.calls == [("tiny", 3, True)]  # full-unfreeze only: no backbone probe
    assert "last-layer seed 0: already in" in capsys.readouterr().out
    results = read_results(tmp_path)
    assert [r["strategy"] for r in results["rows"]] == ["last-layer", "bitfit", "full-unfreeze"]
    assert all(len(r["test_predictions"]) == 6 for r in results["rows"])  # kept by --resume
    assert len(results["pairwise"]) == 3


def test_results_csv_has_one_header_that_every_row_fills_in_its_own_columns(
        tree: Path, tmp_path: Path) -> None:
    """An advised row (one field more), a failed row (its error) and plain rows: each value
    under its own header, read back with csv.DictReader."""
    broken = "freeze-all-but:groups=layer4"
    args = argv(tree, tmp_path, "--strategies", f"last-layer,advised,{broken}")
    assert compare.main(args, backbone_factory=Factory()) == 1
    with (tmp_path / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames or []
    assert [r["strategy"] for r in rows] == ["last-layer", "advised", broken]
    assert all(None not in row and len(row) == len(header) for row in rows)  # no spill-over
    from finetune.compare.row import Row

    assert header[:len(Row.csv_columns())] == Row.csv_columns()  # one fixed header
    assert {r["config.data"] for r in rows} == {str(tree)}
    assert {r["config.backbone"] for r in rows} == {"tiny"}
    advised, failed = rows[1], rows[2]
    assert float(advised["advise_seconds"]) > 0 and rows[0]["advise_seconds"] == ""
    assert failed["failed"] == "True" and "layer4" in failed["error"]
    assert failed["test_accuracy"] == "" and float(rows[0]["test_accuracy"]) >= 0


def test_ctrl_c_keeps_finished_rows(tree: Path, tmp_path: Path) -> None:
    # Calls: 1 = last-layer, 2 = bitfit (interrupted).
    factory = Factory(fail_on_call=2, error=KeyboardInterrupt())
    args = argv(tree, tmp_path, "--strategies", "last-layer,bitfit")
    assert compare.main(args, backbone_factory=factory) == 130
    assert [r["strategy"] for r in read_results(tmp_path)["rows"]] == ["last-layer"]
    assert (tmp_path / "results.csv").read_text().count("\n") == 2  # header + one row


def test_resume_refuses_other_settings(tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "last-layer")
    assert compare.main(args, backbone_factory=Factory()) == 0
    changed = [*args, "--lr", "0.1", "--resume"]
    with pytest.raises(SystemExit, match=r"other settings \(lr: 0.0005 -> 0.1\)"):
        compare.main(changed, backbone_factory=Factory())


def test_inaturalist_without_network_says_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(INaturalist12K, "URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(SystemExit, match=r"--data /path/to/nature_12K\.zip") as error:
        compare.main(["--data", "inaturalist", "--backbone", "tiny", "--output",
                      str(tmp_path / "out")], backbone_factory=Factory())
    assert "ImageFolder tree" in str(error.value)


def test_without_data_it_runs_on_the_packaged_sample_and_says_how_to_go_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no network and no data here: the package alone suffices
    monkeypatch.setattr(INaturalist12K, "URL", (tmp_path / "missing.zip").as_uri())
    args = ["--backbone", "tiny", "--epochs", "1", "--train-per-class", "3", "--image-size",
            "32", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--strategies",
            "last-layer", "--output", str(tmp_path / "out")]
    assert compare.main(args, backbone_factory=Factory()) == 0
    results = read_results(tmp_path / "out")
    assert results["classes"] == list(SAMPLE_CLASSES)
    row = results["rows"][0]
    assert row["train_images"] + row["val_images"] == 30 and row["test_images"] == 80
    out = capsys.readouterr().out
    assert "--data inaturalist --preset reference" in out and "--data DIR" in out
    assert "one image moves accuracy by 1.2 points" in out


def test_wandb_logs_each_strategy_offline_in_one_group(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = argv(tree, tmp_path / "out", "--strategies", "last-layer,bitfit", "--wandb",
                "--tune", "none")
    assert compare.main(args, backbone_factory=Factory()) == 0
    runs = sorted((tmp_path / "out" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    group = read_results(tmp_path / "out")["config"]["wandb_group"]
    assert group.startswith("compare-")


def test_real_photos(shared_data: Path, tmp_path: Path) -> None:
    args = ["--data", str(shared_data / "hymenoptera"), "--backbone", "tiny", "--epochs", "1",
            "--train-per-class", "6", "--image-size", "32", "--workers", "0", "--precision",
            "fp32", "--device", "cpu", "--strategies", "last-layer", "--output", str(tmp_path)]
    assert compare.main(args, backbone_factory=Factory()) == 0
    row = read_results(tmp_path)["rows"][0]
    assert row["train_images"] + row["val_images"] == 12 and row["test_images"] == 153


# -- how sure the comparison is -----------------------------------------------------------------
def synthetic_row(strategy: str, seed: int, predictions: np.ndarray, targets: np.ndarray,
                  trainable_pct: float, seconds: float) -> dict:
    accuracy = float(np.mean(predictions == targets))
    return {"strategy": strategy, "seed": seed, "epochs": 1, "trainable_params": 10,
            "trainable_pct": trainable_pct, "val_accuracy": accuracy, "test_accuracy": accuracy,
            "seconds_per_epoch": seconds, "images_per_second": 1.0, "peak_memory_mib": 1.0,
            "per_class_test_accuracy": {c: float(np.mean(predictions[targets == k] == k))
                                        for k, c in enumerate(CLASSES)},
            "test_predictions": predictions.tolist()}


def test_clear_winner_is_significant_a_tie_is_a_tie_and_the_verdict_says_so(
    tmp_path: Path,
) -> None:
    """Known answer, no training: `good` and `twin` are 95% right (other images wrong),
    `bad` 40%; two seeds each."""
    targets = np.repeat(np.arange(3), 40)
    rng = np.random.default_rng(0)

    def model(accuracy: float) -> np.ndarray:
        return np.where(rng.random(targets.size) < accuracy, targets, (targets + 1) % 3)

    specs = {"good": (100.0, 9.0, 0.95), "twin": (1.0, 3.0, 0.95), "bad": (1.0, 3.0, 0.4)}
    rows = [synthetic_row(name, seed, model(accuracy), targets, pct, seconds)
            for name, (pct, seconds, accuracy) in specs.items() for seed in (0, 1)]
    settings = compare.Settings.from_dict(dict(
        backbone="tiny", data="synthetic", epochs=1, train_per_class=None, val_split=0.2,
        image_size=32, batch_size=4, lr=1e-3, precision="fp32", device="cpu", pre_resize=False,
        augment=False,
        preset="quick", strategies=list(specs), seeds=(0, 1), command="synthetic"))
    printed = compare.write_outputs(tmp_path, settings, CLASSES, rows, [],
                                    targets=targets.tolist())

    results = read_results(tmp_path)
    pairs = {(p["a"], p["b"]): p for p in results["pairwise"]}
    assert pairs["good", "bad"]["significant"] and pairs["twin", "bad"]["significant"]
    assert pairs["good", "bad"]["ci95"][0] > 0.4  # 55 points apart, give or take
    assert not pairs["good", "twin"]["significant"]
    assert pairs["good", "twin"]["ci95"][0] < 0 < pairs["good", "twin"]["ci95"][1]
    assert set(results["best_within_noise"]) == {"good", "twin"}
    assert results["verdict"].endswith(
        "are tied within noise (paired bootstrap, 95%, Holm-corrected); twin trains 1.0% of "
        "the parameters and is 3.0× faster than good.")
    assert results["verdict"] in printed and results["verdict"] in (
        tmp_path / "results.md").read_text()
    assert "| good | bad | +" in (tmp_path / "pairwise.md").read_text()
    # Per class: bad is 55 points worse on each class's 40 images: every bad cell is starred.
    per_class = (tmp_path / "per_class.md").read_text()
    bad_line = next(line for line in per_class.splitlines() if line.startswith("| bad |"))
    assert bad_line.count("*") == 3 and "| good |" in per_class
    reference = results["per_class_differs_from"]["reference"]  # the more accurate of the two
    assert reference == results["best_within_noise"][0] in {"good", "twin"}
    assert f"differs from {reference}'s accuracy on that class beyond noise" in per_class


def test_auto_seeds_follow_the_cost_of_one_run() -> None:
    rows = [{"strategy": name, "seed": 0, "seconds_per_epoch": seconds, "epochs": 2}
            for name, seconds in (("probe", 1.0), ("half", 4.9), ("full", 10.0))]
    rows.append({"strategy": "probe", "seed": 1, "seconds_per_epoch": 99.0, "epochs": 2})
    plan = compare_run.auto_seeds(rows, ["probe", "half", "full", "failed"])
    assert plan == {"probe": 5, "half": 2, "full": 1}  # 10/1 capped at 5; int(10/4.9); itself
    assert compare_run.describe_auto_seeds(plan, rows).startswith(
        "--seeds auto: each strategy gets as many seeds as fit in one run of the slowest "
        "(full, 20 s), at most 5: probe 5, half 2, full 1")
    # a tuned row's seed costs its whole lr search, which every extra seed repeats
    rows[0]["tuning"] = {"seconds": 7.0}
    assert compare_run.auto_seeds(rows, ["probe", "half", "full"])["probe"] == 2  # int(20/7)


def test_seeds_auto_runs_the_planned_extra_seeds(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tiny-backbone epoch times are noise, so the plan itself is fixed here (tested above).
    monkeypatch.setattr(compare_run, "auto_seeds",
                        lambda rows, strategies: {"last-layer": 2, "bitfit": 1})
    args = argv(tree, tmp_path, "--strategies", "last-layer,bitfit", "--seeds", "auto")
    assert compare.main(args, backbone_factory=Factory()) == 0
    rows = read_results(tmp_path)["rows"]
    assert [(r["strategy"], r["seed"]) for r in rows] == [
        ("last-layer", 0), ("last-layer", 1), ("bitfit", 0)]
    assert "--seeds auto: each strategy gets" in capsys.readouterr().out
    assert "seeds auto (per strategy: the runs column)" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        compare.main(argv(tree, tmp_path, "--seeds", "some"), backbone_factory=Factory())
    assert "'some' is neither a number nor auto" in capsys.readouterr().err


def test_quick_preset_trains_unaugmented_so_frozen_strategies_train_cached(
        tree: Path, tmp_path: Path) -> None:
    assert compare.main(argv(tree, tmp_path / "quick", "--strategies", "last-layer"),
                        backbone_factory=Factory()) == 0
    results = read_results(tmp_path / "quick")
    assert results["config"]["augment"] == "none"
    assert results["rows"][0]["train_uncached_reason"] is None
    assert compare.main(argv(tree, tmp_path / "augmented", "--strategies", "last-layer",
                             "--augment"), backbone_factory=Factory()) == 0
    results = read_results(tmp_path / "augmented")
    assert results["config"]["augment"] == "flip"  # a bare --augment, as before the policies
    assert "augmentation" in results["rows"][0]["train_uncached_reason"]
    args = compare_run.parse_args(["--preset", "reference"])
    assert compare_run.resolve_settings(args, ["last-layer"], "d", "c").augment == "flip"


class PidFactory:
    """A tiny backbone that leaves a file named after the process that built it (one file per
    build: two builds in one worker are two files)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, name: str, num_classes: int, pretrained: bool) -> Backbone:
        (self.folder / f"{os.getpid()}-{name}-{pretrained}-{uuid.uuid4().hex[:8]}").touch()
        return make_tiny_backbone(num_classes=num_classes)


@pytest.mark.subprocess
def test_jobs_run_side_by_side_in_worker_processes(tree: Path, tmp_path: Path) -> None:
    built = tmp_path / "built"
    built.mkdir()
    args = argv(tree, tmp_path / "out", "--strategies", "last-layer,full-unfreeze,from-scratch",
                "--seeds", "2", "--jobs", "2")
    assert compare.main(args, backbone_factory=PidFactory(built)) == 0
    results = read_results(tmp_path / "out")
    assert [(r["strategy"], r["seed"]) for r in results["rows"]] == [  # in table order
        (s, seed) for s in ("last-layer", "full-unfreeze", "from-scratch") for seed in (0, 1)]
    pids = {int(path.name.split("-")[0]) for path in built.iterdir()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # two workers did all six
    assert sum("-False-" in path.name for path in built.iterdir()) == 2  # from-scratch
    assert {r["jobs"] for r in results["rows"]} == {2}
    assert "2 runs at once" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.subprocess
def test_a_failing_run_in_a_worker_is_reported_and_the_others_finish(
        tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = "freeze-all-but:groups=layer4"  # the tiny backbone has no layer4: fails in fit
    args = argv(tree, tmp_path, "--strategies", f"last-layer,{broken}", "--jobs", "2")
    assert compare.main(args, backbone_factory=Factory()) == 1
    results = read_results(tmp_path)
    assert [r["strategy"] for r in results["rows"]] == ["last-layer"]
    assert results["failed"][0]["strategy"] == broken
    err = capsys.readouterr().err
    assert "layer4" in err and "Traceback" in err  # the worker's own traceback comes back


def test_jobs_default_to_one_per_core_on_a_cpu_and_one_on_a_gpu(tree: Path) -> None:
    from finetune.compare.settings import parse_args, resolve_settings

    cores = os.cpu_count() or 1
    plenty = 64 * 1024**3
    assert pool.auto_jobs(5, "cpu", 1, ram=plenty) == min(5, cores, pool.MAX_AUTO_JOBS)
    assert pool.auto_jobs(1, "cpu", 1, ram=plenty) == 1
    assert pool.auto_jobs(5, "cpu", 1, ram=8 * 1024**3) == 1  # one run's worth of memory
    assert pool.auto_jobs(5, "cuda", 1) == pool.auto_jobs(5, "cpu", 2) == 1
    args = parse_args(["--data", str(tree), "--device", "cpu"])
    quick = resolve_settings(args, ["last-layer", "full-unfreeze"], str(tree), "")
    assert quick.jobs == pool.auto_jobs(2, "cpu", 1) >= 1
    args = parse_args(["--data", str(tree), "--preset", "reference", "--device", "cpu"])
    assert resolve_settings(args, ["last-layer", "full-unfreeze"], str(tree), "").jobs == 1
    with pytest.raises(SystemExit, match="pick one"):
        resolve_settings(parse_args(["--nproc", "2", "--jobs", "2", "--tune", "none"]),
                         ["last-layer"], ".", "")


def test_runs_share_the_cores_and_the_last_ones_take_what_others_free() -> None:
    import multiprocessing

    threads = torch.get_num_threads()
    counts = multiprocessing.get_context("spawn").Array("i", [3, 2, 0])  # waiting, running, stop
    share = pool.CoreShare(counts, jobs=2, cores=8)
    try:
        share.apply()
        assert torch.get_num_threads() == 4
        counts[:] = [3, 1, 0]  # a run ended but another will start: no widening yet
        share.on_train_batch_end(None, None, None)
        assert torch.get_num_threads() == 4
        counts[:] = [0, 1, 0]  # nothing left to start: the last run takes every core
        share.on_train_batch_end(None, None, None)
        assert torch.get_num_threads() == 8
        share = pool.CoreShare(counts, jobs=16, cores=8)
        counts[:] = [5, 16, 0]  # more runs than cores: one thread each
        share.on_epoch_start(None, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


class InterruptingFactory:
    """Ctrl-C inside a worker: the backbone for from-scratch (random init) raises it."""

    def __call__(self, name: str, num_classes: int, pretrained: bool) -> Backbone:
        if not pretrained:
            raise KeyboardInterrupt
        return make_tiny_backbone(num_classes=num_classes)


@pytest.mark.subprocess
def test_ctrl_c_in_a_worker_stops_the_comparison_and_keeps_finished_rows(
        tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "from-scratch,last-layer,full-unfreeze",
                "--jobs", "2")
    assert compare.main(args, backbone_factory=InterruptingFactory()) == 130
    rows = read_results(tmp_path)["rows"]
    assert {r["strategy"] for r in rows} <= {"last-layer"}  # full-unfreeze never ran


def test_a_stopped_comparison_ends_the_runs_in_progress_and_starts_no_more() -> None:
    import multiprocessing

    counts = multiprocessing.get_context("spawn").Array("i", [1, 2, 1])  # stop flag set
    with pytest.raises(StopFit, match="stopped"):  # a callback's power: end the fit at once
        pool.CoreShare(counts, jobs=2, cores=2).on_train_batch_end(None, None, None)
    pool._start_worker(counts, 2)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped"):
            pool._in_worker(lambda *args, **kwargs: pytest.fail("a run started after the stop"),
                            "last-layer", 0, {})
        assert list(counts) == [0, 2, 1]  # counted in and out again
    finally:
        pool._start_worker(None, 1)


# -- per-strategy lr tuning ------------------------------------------------------------------
class CountingLoader:
    """A test loader that counts its passes: the test set is for the chosen run alone."""

    passes = 0

    def __init__(self, loader) -> None:
        self.loader = loader
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __iter__(self):
        type(self).passes += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def test_tuned_rows_use_the_test_set_once_and_record_their_search(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.data import ImageFolderData

    original = ImageFolderData.test_loader
    monkeypatch.setattr(ImageFolderData, "test_loader",
                        lambda self, *a, **k: CountingLoader(original(self, *a, **k)))
    CountingLoader.passes = 0
    args = argv(tree, tmp_path, "--strategies", "last-layer,full-unfreeze", "--epochs", "2",
                "--tune", "lr", "--lr-grid", "1e-3,1e-2")
    assert compare.main(args, backbone_factory=Factory()) == 0
    assert CountingLoader.passes == 2  # one pass per row, however many candidates trained
    results = read_results(tmp_path)
    assert results["config"]["tune"] == "lr"
    assert results["config"]["lr_grid"] == [0.0005, 0.001, 0.01]  # --lr is always tried
    for row in results["rows"]:
        tuning = row["tuning"]
        assert tuning["parameter"] == "lr" and tuning["chosen"] == row["lr"]
        assert {c["lr"] for c in tuning["candidates"]} >= {0.0005, 0.001, 0.01}
        for candidate in tuning["candidates"]:
            assert set(candidate) >= {"lr", "val_accuracy", "epochs"}
        chosen = next(c for c in tuning["candidates"] if c["lr"] == row["lr"])
        assert chosen["epochs"] == row["epochs"] == 2
        assert chosen["val_accuracy"] == row["val_accuracy"]
        assert tuning["seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| strategy | lr |" in table and "evaluated once per row" in table


def test_resume_keeps_the_tuning_of_finished_rows(tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "last-layer", "--tune", "lr")
    assert compare.main(args, backbone_factory=Factory()) == 0
    before = read_results(tmp_path)["rows"][0]["tuning"]
    assert before is not None
    more = [*argv(tree, tmp_path, "--strategies", "last-layer,bitfit", "--tune", "lr"),
            "--resume"]
    assert compare.main(more, backbone_factory=Factory()) == 0
    rows = read_results(tmp_path)["rows"]
    assert rows[0]["tuning"] == before and rows[1]["tuning"]["parameter"] == "lr"


def test_a_resume_never_mixes_rows_the_previous_race_chose(tree: Path, tmp_path: Path) -> None:
    """results.json written before `select` existed was tuned by the previous race: a tuned
    resume of it is refused, naming the setting; an untuned one goes on."""
    args = argv(tree, tmp_path, "--strategies", "last-layer", "--tune", "lr")
    assert compare.main(args, backbone_factory=Factory()) == 0
    path = tmp_path / "results.json"
    older = json.loads(path.read_text())
    assert older["config"]["select"] == "loss"
    del older["config"]["select"]
    path.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match=r"other settings \(select: None -> 'loss'\)"):
        compare.main([*argv(tree, tmp_path, "--strategies", "last-layer,bitfit", "--tune", "lr"),
                      "--resume"], backbone_factory=Factory())
    untuned = tmp_path / "untuned"
    assert compare.main(argv(tree, untuned, "--strategies", "last-layer"),
                        backbone_factory=Factory()) == 0
    older = json.loads((untuned / "results.json").read_text())
    assert older["config"]["select"] is None
    del older["config"]["select"]
    (untuned / "results.json").write_text(json.dumps(older))
    assert compare.main([*argv(tree, untuned, "--strategies", "last-layer,bitfit"), "--resume"],
                        backbone_factory=Factory()) == 0


def test_untuned_rows_say_so(tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "last-layer", "--tune", "none", "--lr", "0.01")
    assert compare.main(args, backbone_factory=Factory()) == 0
    row = read_results(tmp_path)["rows"][0]
    assert row["tuning"] is None and row["lr"] == 0.01
    with pytest.raises(SystemExit, match="--lr-grid is the grid --tune lr searches"):
        compare.main([*args, "--lr-grid", "1e-3", "--overwrite"], backbone_factory=Factory())


def test_the_advised_row_trains_the_advisors_pick_and_counts_its_time(
        tree: Path, tmp_path: Path) -> None:
    args = argv(tree, tmp_path, "--strategies", "last-layer,advised", "--tune", "lr",
                "--epochs", "2")
    assert compare.main(args, backbone_factory=Factory()) == 0
    results = read_results(tmp_path)
    advised = next(r for r in results["rows"] if r["strategy"] == "advised")
    pick = advised["advice"]["strategy"]
    # as results.json holds it (a tuple of groups reads back as a list)
    expected = json.loads(json.dumps(compare.parse_run(pick).strategy.state_dict()))
    assert advised["strategy_state"] == expected
    assert [d["name"] for d in advised["advice"]["depths"]] == ["none", "stem", "block1",
                                                               "block2"]
    assert advised["advise_seconds"] > 0 and advised["tuning"] is not None
    summary = next(s for s in results["summary"] if s["strategy"] == "advised")
    assert summary["advised"] == [pick]
    text = (tmp_path / "results.md").read_text()
    assert f"| advised ({pick}) |" in text and "`finetune advise` recommended" in text


def test_every_recipe_is_a_compare_flag_recorded_and_named_above_the_table(
        tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipes"
    assert compare.main(argv(tree, out, "--strategies", "last-layer", "--tune", "none",
                             "--augment", "trivial", "--crop-scale", "0.5", "--ema", "0.9",
                             "--mixup", "0.2", "--cutmix", "1.0", "--balance", "loss",
                             "--tta", "flip"), backbone_factory=Factory()) == 0
    results = read_results(out)
    config = results["config"]
    assert (config["augment"], config["crop_scale"], config["ema_decay"], config["mixup"],
            config["cutmix"], config["balance"], config["tta"]) == (
        "trivial", [0.5, 1.0], 0.9, 0.2, 1.0, "loss", "flip")
    assert "MixUp" in results["rows"][0]["train_uncached_reason"]
    table = (out / "results.md").read_text()
    assert "**validation and test accuracies are of the EMA weights** (decay 0.9)" in table
    assert "augmentation trivial (crops 0.5–1 of the area)" in table
    assert "test-time augmentation flip" in table
    # results written before the policies (augment true/false) still resume
    settings = compare_run.resolve_settings(compare_run.parse_args(["--augment"]), ["a"], "d", "c")
    assert "augment" not in " ".join(settings.changed_from({"augment": True}))
    assert "augment" in " ".join(settings.changed_from({"augment": False}))


def test_tune_lr_find_trains_each_row_at_the_range_tests_suggestion(
        tree: Path, tmp_path: Path) -> None:
    assert compare.main(argv(tree, tmp_path / "lrf", "--strategies", "last-layer",
                             "--tune", "lr-find"), backbone_factory=Factory()) == 0
    row = read_results(tmp_path / "lrf")["rows"][0]
    assert row["lr"] == row["lr_find"]["chosen"] and row["tuning"] is None
    assert row["lr_find"]["steps"] >= 3 and row["lr_find"]["seconds"] > 0
    assert "lr range test" in (tmp_path / "lrf" / "results.md").read_text()


def test_hindsight_rows_are_measurements_kept_out_of_the_rows_and_the_verdict(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lr the search could choose, trained at a fixed lr and read on test once each:
    labelled hindsight in every output, beside the tuned row, and never a row itself."""
    from finetune.data import ImageFolderData

    original = ImageFolderData.test_loader
    monkeypatch.setattr(ImageFolderData, "test_loader",
                        lambda self, *a, **k: CountingLoader(original(self, *a, **k)))
    CountingLoader.passes = 0
    args = argv(tree, tmp_path, "--strategies", "last-layer,bitfit", "--tune", "lr",
                "--lr", "1e-3", "--lr-grid", "1e-3,1e-2", "--hindsight")
    assert compare.main(args, backbone_factory=Factory()) == 0
    results = read_results(tmp_path)
    assert [r["strategy"] for r in results["rows"]] == ["last-layer", "bitfit"]
    assert all(r["tuning"]["select"] == "loss" for r in results["rows"])
    assert [s["strategy"] for s in results["summary"]] == ["last-layer", "bitfit"]
    measured = results["hindsight"]
    lrs = {spec: {c["lr"] for r in results["rows"] if r["strategy"] == spec
                  for c in r["tuning"]["candidates"]} for spec in ("last-layer", "bitfit")}
    assert all(h["hindsight"] for h in measured["rows"])
    assert {(h["strategy"], h["lr"]) for h in measured["rows"]} == {
        (spec, lr) for spec, tried in lrs.items() for lr in tried | {1e-3, 1e-2}}
    assert CountingLoader.passes == 2 + len(measured["rows"])  # once per row, once per lr
    for entry in measured["summary"]:
        assert entry["label"].startswith("hindsight")
        assert entry["best_test_accuracy"] == max(entry["fixed"].values())
        assert "tuned_minus_best" in entry
    text = (tmp_path / "results.md").read_text()
    table, _, section = text.partition("## Hindsight (a measurement")
    assert section and not any("hindsight" in line for line in table.splitlines()
                               if line.startswith("| "))  # no row of the table or pairs
    assert "chosen by validation loss" in table
    csv_rows = list(csv.DictReader((tmp_path / "hindsight.csv").open()))
    assert {r["label"] for r in csv_rows} == {"hindsight"}
    with pytest.raises(SystemExit, match="--hindsight measures what --tune lr"):
        compare.main(argv(tree, tmp_path / "b", "--hindsight"), backbone_factory=Factory())


def test_without_matplotlib_the_tables_are_written_and_one_line_says_how_to_get_plots(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    args = argv(tree, tmp_path, "--strategies", "last-layer,bitfit")
    assert compare.main(args, backbone_factory=Factory()) == 0
    out = capsys.readouterr().out
    assert out.count("plots skipped: matplotlib is not installed") == 1
    assert "pip install 'finetune[plots]'" in out
    written = {p.name for p in tmp_path.iterdir()}
    assert {"results.json", "results.csv", "results.md", "per_class.md"} <= written
    assert not any(name.endswith(".png") for name in written)
