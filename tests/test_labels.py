"""Label files in: a CSV (path,label,split), JSON Lines and Hugging Face's imagefolder
metadata.csv name the same images a tree does and give the same split, the same training and
the same comparison; every bad row is one line naming the row and the fix, before anything is
written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.compare import run as compare_run
from finetune.data import ImageSplits
from finetune.data.labels import write_label_file
from finetune.errors import DataError
from tests.conftest import TINY, make_tree
from tests.test_compare import Factory, read_results


def as_label_file(tree: Path, target: Path, split_seed: int = 0) -> Path:
    """The tree's images as a CSV beside it: train rows, and its test folder's as test."""
    splits = ImageSplits.scan(tree, val_split=0.0, split_seed=split_seed, progress=False)
    rows = [(path, splits.classes[label], "train") for path, label in splits.train]
    rows += [(path, splits.classes[label], "test") for path, label in splits.test]
    return write_label_file(target, rows)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree", n_train=6, n_test=3)


def test_a_label_file_splits_exactly_as_its_tree(tree: Path) -> None:
    labels = as_label_file(tree, tree / "labels.csv")
    for seed in (0, 5):
        a = ImageSplits.scan(tree, val_split=0.34, split_seed=seed, progress=False)
        b = ImageSplits.scan(labels, val_split=0.34, split_seed=seed, progress=False)
        assert (a.classes, a.train, a.val, a.test) == (b.classes, b.train, b.val, b.test)


def test_json_lines_and_hugging_face_metadata_name_the_same_images(tree: Path) -> None:
    expected = ImageSplits.scan(tree, val_split=0.2, progress=False)
    csv_file = as_label_file(tree, tree / "labels.csv")
    rows = [line.split(",") for line in csv_file.read_text().splitlines()[1:]]
    jsonl = tree / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": label, "split": split}) + "\n"
                             for p, label, split in rows))
    (tree / "metadata.csv").write_text("file_name,label,split\n" + "".join(
        f"{p},{label},{split}\n" for p, label, split in rows))
    hugging_face = tree.parent / "hf"
    shutil.copytree(tree, hugging_face)  # a folder with metadata.csv and no train/ folder
    shutil.rmtree(hugging_face / "train")
    shutil.copytree(tree / "train", hugging_face / "images" / "train")
    (hugging_face / "metadata.csv").write_text((tree / "metadata.csv").read_text().replace(
        "train/", "images/train/"))
    for source in (jsonl, hugging_face):
        found = ImageSplits.scan(source, val_split=0.2, progress=False)
        assert found.classes == expected.classes
        assert [p.name for p, _ in found.train] == [p.name for p, _ in expected.train]
        assert len(found.test) == len(expected.test)


def cli_train(data: Path, run: Path) -> int:
    return main(["train", "--data", str(data), "--backbone", TINY, "--epochs", "2",
                 "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu",
                 "--precision", "fp32", "--strategy", "freeze-80", "--val-split", "0.34",
                 "--checkpoint-dir", str(run)])


def test_training_from_a_label_file_equals_training_from_the_tree(
        tree: Path, tmp_path: Path) -> None:
    labels = as_label_file(tree, tree / "labels.csv")
    assert cli_train(tree, tmp_path / "a") == 0 and cli_train(labels, tmp_path / "b") == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "b"), "--backbone", TINY,
                 "--device", "cpu", "--workers", "0"]) == 0


def test_a_comparison_of_a_label_file_equals_the_trees(tree: Path, tmp_path: Path) -> None:
    labels = as_label_file(tree, tree / "labels.csv")
    results = []
    for data, out in ((tree, tmp_path / "a"), (labels, tmp_path / "b")):
        argv = ["--data", str(data), "--backbone", "tiny", "--epochs", "1", "--batch-size", "4",
                "--image-size", "32", "--workers", "0", "--precision", "fp32", "--device",
                "cpu", "--jobs", "1", "--tune", "none", "--strategies", "last-layer,bitfit",
                "--output", str(out)]
        assert compare_run.main(argv, backbone_factory=Factory()) == 0
        results.append(read_results(out))
    a, b = results
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        assert row_a["test_predictions"] == row_b["test_predictions"]
        assert row_a["history"][-1]["train_loss"] == row_b["history"][-1]["train_loss"]


BAD = {
    "a missing file": ("path,label,split\ntrain/class0/img0.jpg,class0,train\n"
                       "train/class0/nope.jpg,class0,train\nval/class0/img0.jpg,class0,test\n",
                       "line 3: 'train/class0/nope.jpg' is not a file"),
    "an unknown split": ("path,label,split\ntrain/class0/img0.jpg,class0,holdout\n",
                         "line 2: split 'holdout' for 'train/class0/img0.jpg' is not one of"),
    "an empty class": ("path,label,split\ntrain/class0/img0.jpg,class0,train\n"
                       "val/class1/img0.jpg,class1,test\n",
                       "class(es) ['class1'] have no train rows"),
    "a duplicated path": ("path,label,split\ntrain/class0/img0.jpg,class0,train\n"
                          "./train/class0/img0.jpg,class0,train\n",
                          "is named twice (line 2 and line 3)"),
    "no label column": ("path,kind\ntrain/class0/img0.jpg,class0\n",
                        "has no label column: its columns are kind, path"),
    "an empty label": ("path,label\ntrain/class0/img0.jpg,\n",
                       "line 2: 'train/class0/img0.jpg' has no label"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_label_file_is_one_line_and_leaves_nothing_behind(
        case: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    text, message = BAD[case]
    labels = tree / "labels.csv"
    labels.write_text(text)
    with pytest.raises(DataError) as error:
        ImageSplits.scan(labels, progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    assert cli_train(labels, tmp_path / "run") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not cache.exists()


# -- error analysis out --------------------------------------------------------------------------
def test_top_losses_lead_with_the_image_a_hand_computation_finds_worst(tree: Path) -> None:
    import numpy as np

    from finetune import LastLayerOnly, TrainConfig, Trainer
    from finetune.data import ImageFolderData
    from finetune.stats.analysis import ErrorAnalysis
    from tests.conftest import make_tiny_backbone

    data = ImageFolderData(ImageSplits.scan(tree, val_split=0.0, progress=False),
                           batch_size=4, image_size=32, num_workers=0)
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(),
                      TrainConfig(epochs=1, lr=1e-2, precision="fp32", device="cpu"))
    trainer.fit(data.train_loader())
    report = trainer.evaluate(data.test_loader())
    analysis = ErrorAnalysis(report, [str(p) for p, _ in data.test_samples])
    probabilities = trainer.predict(data.test_loader(), probabilities=True).numpy()
    labels = np.array([label for _, label in data.test_samples])
    by_hand = -np.log(probabilities[np.arange(len(labels)), labels])
    worst = analysis.top_losses()
    assert worst[0].path == str(data.test_samples[int(by_hand.argmax())][0])
    assert [row.loss for row in worst] == pytest.approx(sorted(by_hand, reverse=True), rel=1e-4)
    assert worst[0].probability == pytest.approx(probabilities[int(by_hand.argmax())].max(),
                                                 rel=1e-4)


def test_evaluate_writes_the_analysis_beside_the_run(tree: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import csv

    assert cli_train(tree, tmp_path / "run") == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--backbone", TINY,
                 "--device", "cpu", "--workers", "0", "--worst", "4"]) == 0
    folder = tmp_path / "run" / "analysis-test"
    assert {p.name for p in folder.iterdir()} == {"top_losses.csv", "top_losses.png",
                                                 "confusion.png", "confused.txt"}
    with (folder / "top_losses.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and [float(r["loss"]) for r in rows] == sorted(
        (float(r["loss"]) for r in rows), reverse=True)
    assert "error analysis:" in capsys.readouterr().out


def test_many_classes_show_the_most_confused_in_a_readable_matrix() -> None:
    import numpy as np

    from finetune.stats.analysis import MAX_MATRIX_CLASSES, ErrorAnalysis
    from finetune.stats.metrics import EvaluationReport

    classes = [f"c{i}" for i in range(101)]
    truth = np.repeat(np.arange(101), 4)
    predicted = truth.copy()
    predicted[::4] = (truth[::4] + 1) % 101  # one image in four of every class
    predicted[:12] = 50  # classes 0-2 are taken for class 50 most
    report = EvaluationReport.from_predictions(truth, predicted, classes,
                                               losses=np.linspace(3, 0, len(truth)))
    analysis = ErrorAnalysis(report, [f"{i}.jpg" for i in range(len(truth))])
    shown = analysis.shown_classes()
    assert len(shown) == MAX_MATRIX_CLASSES and {0, 1, 2, 50} <= set(shown)
    assert analysis.confused_pairs()[0].words() == "c0 taken for c50: 4 images (100% of c0)"
    image = analysis._confusion_image()
    assert image.width < 1400 and image.height < 1400


def test_paths_and_labels_or_a_dataframe_split_as_the_tree(tree: Path) -> None:
    from finetune.data import ImageFolderData

    expected = ImageSplits.scan(tree, val_split=0.34, split_seed=2, progress=False)
    samples = [(p, expected.classes[label], "train") for p, label in
               expected.train + expected.val] + [(p, expected.classes[label], "test")
                                                 for p, label in expected.test]
    # a DataFrame's interface as from_dataframe reads it: columns by name (pandas' too)
    frame = {"file": [str(p.relative_to(tree)) for p, _, _ in samples],
             "species": [label for _, label, _ in samples],
             "split": [s for _, _, s in samples]}
    found = ImageSplits.from_dataframe(frame, path="file", label="species", folder=tree,
                                       val_split=0.34, split_seed=2)
    assert (found.classes, found.train, found.val, found.test) == (
        expected.classes, expected.train, expected.val, expected.test)
    lists = ImageSplits.from_labels(frame["file"], frame["species"], frame["split"],
                                    folder=tree, val_split=0.34, split_seed=2)
    assert lists.train == expected.train
    data = ImageFolderData(found, batch_size=4, image_size=32, num_workers=0)
    assert len(data.test_samples) == len(expected.test)
    with pytest.raises(DataError, match="has no column 'path'"):
        ImageSplits.from_dataframe(frame, folder=tree)
    with pytest.raises(DataError, match="row 1: split 'holdout'"):
        ImageSplits.from_labels(["a.jpg", "b.jpg"], ["x", "y"], ["train", "holdout"])


def test_the_packaged_sample_as_a_csv_compares_and_advises_as_its_tree(
        tmp_path: Path) -> None:
    from finetune.data.sample import sample_dataset

    sample = Path(sample_dataset())
    labels = as_label_file(sample, tmp_path / "sample.csv")  # paths outside: absolute
    results = []
    for data, out in ((sample, tmp_path / "a"), (labels, tmp_path / "b")):
        argv = ["--data", str(data), "--backbone", "tiny", "--epochs", "1", "--batch-size", "8",
                "--image-size", "32", "--workers", "0", "--precision", "fp32", "--device",
                "cpu", "--jobs", "1", "--tune", "none", "--train-per-class", "6",
                "--strategies", "last-layer", "--output", str(out)]
        assert compare_run.main(argv, backbone_factory=Factory()) == 0
        results.append(read_results(out)["rows"][0])
    assert results[0]["test_predictions"] == results[1]["test_predictions"]
    assert results[0]["val_accuracy"] == results[1]["val_accuracy"]
    advice = []
    for data, out in ((sample, tmp_path / "advice-a"), (labels, tmp_path / "advice-b")):
        assert main(["advise", "--data", str(data), "--backbone", TINY, "--epochs", "1",
                     "--batch-size", "8", "--image-size", "32", "--workers", "0", "--device",
                     "cpu", "--precision", "fp32", "--train-per-class", "6",
                     "--budget", "0", "--output", str(out)]) == 0
        advice.append(json.loads((out / "advise.json").read_text()))
    probes = [[d.get("probe_val_accuracy") for d in a["depths"]] for a in advice]
    assert probes[0] == probes[1]
    assert advice[0]["recommendation"]["strategy"] == advice[1]["recommendation"]["strategy"]


def test_predict_reads_the_images_a_label_file_names(tree: Path, tmp_path: Path) -> None:
    import csv

    labels = as_label_file(tree, tree / "labels.csv")
    assert cli_train(tree, tmp_path / "run") == 0
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tmp_path / "run"), str(labels), "--top-k", "1", "--output",
                 str(out), "--backbone", TINY, "--device", "cpu"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 3 + 3 * 3 and all(row["error"] == "" for row in rows)


def test_the_per_class_heatmap_of_101_classes_stays_readable(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from finetune.compare import plots

    if not plots.available():
        pytest.skip("matplotlib is not installed (the [plots] extra)")
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.6, 0.9, (5, 101))
    matrix[:, 7] = [0.0, 0.2, 0.5, 0.9, 1.0]  # the class where strategies differ most
    assert plots.heatmap_rows(matrix)[0] == 7 and len(plots.heatmap_rows(matrix)) == 40
    path = plots.plot_per_class_heatmap([f"s{i}" for i in range(5)],
                                        [f"class{i}" for i in range(101)], matrix,
                                        tmp_path / "heatmap.png")
    with Image.open(path) as image:
        assert image.width < 1500 and image.height < 1800
