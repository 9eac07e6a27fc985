"""Per-class metrics from a confusion matrix: accuracy, precision, recall, F1, support.

Everything derives from one K×K matrix (rows = true class, columns = predicted), so the
numbers agree with each other and with scikit-learn's `classification_report`; 0/0 is
defined as 0 (scikit-learn's `zero_division=0`), e.g. the precision of a class never predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_pred: Sequence[int] | np.ndarray | torch.Tensor,
    num_classes: int,
) -> np.ndarray:
    """K×K counts; entry [i, j] is how many images of true class i were predicted as j."""
    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"{true.size} labels but {pred.size} predictions; they must pair up")
    for label, values in (("label", true), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"a {label} lies outside 0..{num_classes - 1}: got {values.min()}..{values.max()}"
            )
    flat = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division, 0 where the denominator is 0 (a class never predicted)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@attrs.frozen(kw_only=True, eq=False)
class EvaluationReport:
    """A model's predictions on one loader, summarised per class.

    `recall` is also the per-class accuracy (correct / images of that class). `targets` and
    `predictions` (per image, in the loader's order) are kept when built from predictions, so
    `finetune.stats.significance` can put intervals on the numbers and compare two models.
    """

    classes: tuple[str, ...] = attrs.field(converter=tuple)
    confusion_matrix: np.ndarray
    loss: float | None = None
    targets: np.ndarray | None = None
    predictions: np.ndarray | None = None
    # each image's cross-entropy, in the loader's order: what a paired comparison of two
    # models on the same images (the lr search) needs beyond their means
    losses: np.ndarray | None = None
    # each image's probability of its predicted class (the model's confidence)
    confidences: np.ndarray | None = None

    @classmethod
    def from_predictions(
        cls,
        y_true: Sequence[int] | np.ndarray | torch.Tensor,
        y_pred: Sequence[int] | np.ndarray | torch.Tensor,
        classes: Sequence[str] | int,
        loss: float | None = None,
        losses: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        confidences: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> EvaluationReport:
        names = [str(i) for i in range(classes)] if isinstance(classes, int) else list(classes)
        true = np.asarray(y_true, dtype=np.int64).ravel()
        pred = np.asarray(y_pred, dtype=np.int64).ravel()
        per_image = None if losses is None else np.asarray(losses, dtype=np.float64).ravel()
        confident = (None if confidences is None
                     else np.asarray(confidences, dtype=np.float64).ravel())
        return cls(classes=names, confusion_matrix=confusion_matrix(true, pred, len(names)),
                   loss=loss, targets=true, predictions=pred, losses=per_image,
                   confidences=confident)

    @property
    def num_samples(self) -> int:
        return int(self.confusion_matrix.sum())

    @property
    def accuracy(self) -> float:
        total = self.num_samples
        return float(np.trace(self.confusion_matrix) / total) if total else 0.0

    @property
    def support(self) -> np.ndarray:
        return self.confusion_matrix.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        return safe_divide(np.diag(self.confusion_matrix), self.confusion_matrix.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        return safe_divide(np.diag(self.confusion_matrix), self.support)

    @property
    def per_class_accuracy(self) -> np.ndarray:
        return self.recall

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return safe_divide(2 * p * r, p + r)

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean()) if len(self.classes) else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) for logs and results files."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
            "classes": list(self.classes),
            "confusion_matrix": self.confusion_matrix.tolist(),
            "per_class": {
                name: {
                    "accuracy": float(self.recall[i]),
                    "precision": float(self.precision[i]),
                    "recall": float(self.recall[i]),
                    "f1": float(self.f1[i]),
                    "support": int(self.support[i]),
                }
                for i, name in enumerate(self.classes)
            },
        }

    def table(self) -> str:
        """A fixed-width text table, one row per class, then overall accuracy and macro F1."""
        width = max([len("class"), *(len(c) for c in self.classes)])
        header = f"{'class':<{width}}  {'acc':>6}  {'prec':>6}  {'recall':>6}  {'f1':>6}  {'n':>6}"
        lines = [header, "-" * len(header)]
        for i, name in enumerate(self.classes):
            lines.append(
                f"{name:<{width}}  {self.recall[i]:>6.3f}  {self.precision[i]:>6.3f}  "
                f"{self.recall[i]:>6.3f}  {self.f1[i]:>6.3f}  {int(self.support[i]):>6d}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"accuracy {self.accuracy:.4f} on {self.num_samples} images · macro F1 "
            f"{self.macro_f1:.4f}" + (f" · loss {self.loss:.4f}" if self.loss is not None else "")
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot_confusion_matrix(self, path: str | Path, normalize: bool = True) -> Path:
        """Save the confusion matrix as a PNG (rows normalised to recall when `normalize`)."""
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

        matrix = self.confusion_matrix.astype(np.float64)
        if normalize:
            matrix = safe_divide(matrix, matrix.sum(axis=1, keepdims=True))
        k = len(self.classes)
        size = max(4.0, 0.45 * k + 2.0)
        figure = Figure(figsize=(size, size))
        axes = figure.subplots()
        image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        axes.set(
            xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
            title=f"accuracy {self.accuracy:.3f}",
        )
        axes.set_xticklabels(self.classes, rotation=45, ha="right")
        axes.set_yticklabels(self.classes)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    text = f"{matrix[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
                    axes.text(j, i, text, ha="center", va="center", fontsize=7,
                              color="white" if matrix[i, j] > 0.5 * matrix.max() else "black")
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        return path
