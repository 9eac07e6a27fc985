"""Per-class metrics must equal scikit-learn's on the same predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from finetune.stats.metrics import EvaluationReport, confusion_matrix

CLASSES = ["cat", "dog", "frog", "newt"]


def predictions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and predictions in which class 3 ("newt") is never predicted."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 3, size=200))
    y_pred[y_pred == 3] = 0
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_numbers_equal_sklearn_classification_report(seed):
    y_true, y_pred = predictions(seed)
    report = EvaluationReport.from_predictions(torch.from_numpy(y_true), y_pred, CLASSES)
    expected = classification_report(y_true, y_pred, labels=range(4), target_names=CLASSES,
                                     output_dict=True, zero_division=0)
    assert (y_pred == 3).sum() == 0 and report.precision[3] == 0.0 and report.f1[3] == 0.0
    for i, name in enumerate(CLASSES):
        assert report.precision[i] == pytest.approx(expected[name]["precision"], abs=1e-12)
        assert report.recall[i] == pytest.approx(expected[name]["recall"], abs=1e-12)
        assert report.f1[i] == pytest.approx(expected[name]["f1-score"], abs=1e-12)
        assert report.support[i] == expected[name]["support"]
    assert report.accuracy == pytest.approx(expected["accuracy"])
    assert report.macro_f1 == pytest.approx(expected["macro avg"]["f1-score"])
    np.testing.assert_array_equal(report.confusion_matrix,
                                  sk_confusion_matrix(y_true, y_pred, labels=range(4)))


def test_per_class_accuracy_is_correct_over_support_and_a_class_without_images_is_zero():
    report = EvaluationReport.from_predictions([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 3)
    np.testing.assert_allclose(report.per_class_accuracy, [0.5, 2 / 3, 0.0])
    assert report.classes == ("0", "1", "2")
    assert report.num_samples == 5 and report.accuracy == pytest.approx(0.6)
    np.testing.assert_array_equal(report.targets, [0, 0, 1, 1, 1])  # kept for intervals
    np.testing.assert_array_equal(report.predictions, [0, 1, 1, 1, 0])


def test_table_and_dict_carry_names_and_values():
    y_true, y_pred = predictions()
    report = EvaluationReport.from_predictions(y_true, y_pred, CLASSES, loss=0.25)
    table = report.table()
    lines = table.splitlines()
    assert lines[0].split() == ["class", "acc", "prec", "recall", "f1", "n"]
    newt = next(line for line in lines if line.startswith("newt"))
    assert newt.split()[2] == "0.000" and int(newt.split()[-1]) == report.support[3]
    assert "loss 0.2500" in table and f"{report.accuracy:.4f}" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["per_class"]["dog"]["f1"] == pytest.approx(report.f1[1])
    assert data["confusion_matrix"] == report.confusion_matrix.tolist()


def test_confusion_matrix_png_is_written(tmp_path):
    y_true, y_pred = predictions()
    path = EvaluationReport.from_predictions(y_true, y_pred, CLASSES).plot_confusion_matrix(
        tmp_path / "sub" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_rejects_mismatched_or_out_of_range_input():
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        confusion_matrix([0, 1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match=r"a prediction lies outside 0..2: got 0..5"):
        confusion_matrix([0, 1], [0, 5], 3)
