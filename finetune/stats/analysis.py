"""Which images a model gets wrong, how sure it was, and which classes it mixes up — from an
`EvaluationReport` and the images' paths, in the loader's order.

`ErrorAnalysis(report, paths).write(folder)` writes:
- `top_losses.csv`: every image, highest cross-entropy first — path, true class, predicted
  class, the predicted class's probability, the true class's probability, loss, correct;
- `top_losses.png`: the worst `worst` images in a captioned grid (true -> predicted, p, loss);
- `confusion.png`: the confusion matrix normalised by true class; past `MAX_MATRIX_CLASSES`
  classes, only the classes of the most confused pairs (the rest are in the CSV);
- `confused.txt`: the most confused pairs in words.
The pictures are drawn with Pillow alone (matplotlib would double the time of an evaluate).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from finetune.atomic import atomic_write, atomic_write_text
from finetune.stats.metrics import EvaluationReport

MAX_MATRIX_CLASSES = 30  # a readable matrix; past it, the classes of the most confused pairs
WORST = 16  # images in the top-losses grid
CELL = 200  # pixels per image in the grid
PAIRS = 10  # confused pairs said in words


def save_png(path: Path, image: Any) -> Path:
    """A PIL image written atomically as PNG."""
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))


@attrs.frozen(kw_only=True)
class TopLoss:
    path: str
    true: str
    predicted: str
    probability: float  # of the predicted class
    true_probability: float
    loss: float

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@attrs.frozen(kw_only=True)
class ConfusedPair:
    true: str
    predicted: str
    count: int
    share: float  # of the true class's images

    def words(self) -> str:
        return (f"{self.true} taken for {self.predicted}: {self.count} image"
                f"{'s' * (self.count != 1)} ({100 * self.share:.0f}% of {self.true})")


@attrs.frozen
class ErrorAnalysis:
    """`report` (with per-image losses and confidences) of the images at `paths`."""

    report: EvaluationReport
    paths: Sequence[str | Path] = attrs.field(converter=lambda p: tuple(map(str, p)))

    def __attrs_post_init__(self) -> None:
        report = self.report
        if report.losses is None or report.predictions is None or report.targets is None:
            raise ValueError("an error analysis needs a report with per-image losses and "
                             "predictions (Trainer.evaluate's)")
        if len(self.paths) != len(report.losses):
            raise ValueError(f"{len(self.paths)} paths for {len(report.losses)} evaluated "
                             "images: pass the paths in the loader's order")

    def top_losses(self) -> list[TopLoss]:
        """Every image, the highest loss first (ties: loader order)."""
        report, classes = self.report, self.report.classes
        losses = np.asarray(report.losses, dtype=np.float64)
        confidences = (report.confidences if report.confidences is not None
                       else np.full(len(losses), math.nan))
        order = np.argsort(-losses, kind="stable")
        return [TopLoss(path=self.paths[i], true=classes[int(report.targets[i])],
                        predicted=classes[int(report.predictions[i])],
                        probability=float(confidences[i]),
                        true_probability=float(np.exp(-losses[i])), loss=float(losses[i]))
                for i in order]

    def confused_pairs(self, limit: int = PAIRS) -> list[ConfusedPair]:
        """The (true, predicted) pairs with most mistakes, most first."""
        matrix, classes = self.report.confusion_matrix, self.report.classes
        support = matrix.sum(axis=1)
        pairs = [ConfusedPair(true=classes[t], predicted=classes[p], count=int(matrix[t, p]),
                              share=float(matrix[t, p] / support[t]) if support[t] else 0.0)
                 for t in range(len(classes)) for p in range(len(classes))
                 if t != p and matrix[t, p] > 0]
        return sorted(pairs, key=lambda pair: (-pair.count, -pair.share))[:limit]

    def words(self) -> str:
        pairs = self.confused_pairs()
        if not pairs:
            return "no image was taken for another class"
        return "most confused: " + "; ".join(pair.words() for pair in pairs)

    def write(self, folder: Path, worst: int = WORST) -> list[Path]:
        """The files of the module docstring; returns those written."""
        folder.mkdir(parents=True, exist_ok=True)
        rows = self.top_losses()
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["path", "true", "predicted", "probability", "true_probability",
                         "loss", "correct"])
        writer.writerows([r.path, r.true, r.predicted, f"{r.probability:.6g}",
                          f"{r.true_probability:.6g}", f"{r.loss:.6g}", r.correct]
                         for r in rows)
        written = [atomic_write_text(folder / "top_losses.csv", buffer.getvalue()),
                   atomic_write_text(folder / "confused.txt", self.words() + "\n")]
        written.append(save_png(folder / "top_losses.png", self._grid_image(rows[:worst])))
        written.append(save_png(folder / "confusion.png", self._confusion_image()))
        return written

    # -- pictures -----------------------------------------------------------------------------
    def shown_classes(self) -> list[int]:
        """The matrix's classes: all of them, or past MAX_MATRIX_CLASSES those of the most
        confused pairs (in class order)."""
        count = len(self.report.classes)
        if count <= MAX_MATRIX_CLASSES:
            return list(range(count))
        index = {name: i for i, name in enumerate(self.report.classes)}
        chosen: list[int] = []
        for pair in self.confused_pairs(limit=count * count):
            for name in (pair.true, pair.predicted):
                if index[name] not in chosen and len(chosen) < MAX_MATRIX_CLASSES:
                    chosen.append(index[name])
        return sorted(chosen) or list(range(MAX_MATRIX_CLASSES))

    def _confusion_image(self, cell: int = 28) -> Any:
        """The matrix normalised by true class as one PIL image: rows true, columns
        predicted, white (0) to dark blue (1), the share written in each cell past 0.5%."""
        from PIL import Image, ImageDraw, ImageFont

        shown = self.shown_classes()
        matrix = self.report.confusion_matrix.astype(np.float64)
        support = matrix.sum(axis=1, keepdims=True)
        normalised = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
        part = normalised[np.ix_(shown, shown)]
        names = [self.report.classes[i][:24] for i in shown]
        font = ImageFont.load_default()
        margin = 8 + 7 * max(len(name) for name in names)
        size = len(names) * cell
        canvas = Image.new("RGB", (margin + size + 10, margin + size + 40), "white")
        draw = ImageDraw.Draw(canvas)
        title = "confusion, normalised by true class (rows true, columns predicted)"
        if len(shown) < len(self.report.classes):
            title += f"; {len(shown)} most confused of {len(self.report.classes)} classes"
        draw.text((4, 4), title, fill="black", font=font)
        top = margin + 24
        for t, name in enumerate(names):
            draw.text((4, top + t * cell + cell // 3), name, fill="black", font=font)
            label = Image.new("RGB", (margin, cell), "white")
            ImageDraw.Draw(label).text((4, cell // 3), name, fill="black", font=font)
            rotated = label.rotate(90, expand=True)
            canvas.paste(rotated, (margin + t * cell, 24))
            for p in range(len(names)):
                value = float(part[t, p])
                shade = (int(255 - 225 * value), int(255 - 160 * value), int(255 - 60 * value))
                box = (margin + p * cell, top + t * cell, margin + (p + 1) * cell - 1,
                       top + (t + 1) * cell - 1)
                draw.rectangle(box, fill=shade, outline=(235, 235, 235))
                if value >= 0.005 and cell >= 24:
                    draw.text((box[0] + 3, box[1] + cell // 3), f"{value:.2f}"[1:] if value < 1
                              else "1.0", fill="white" if value > 0.5 else "black", font=font)
        return canvas

    def _grid_image(self, rows: Sequence[TopLoss], cell: int = CELL) -> Any:
        """The worst images, captioned, as one PIL image (drawn with PIL: a matplotlib grid
        of photos takes a second to render)."""
        from PIL import Image, ImageDraw, ImageFont

        columns = min(4, max(1, len(rows)))
        lines = max(1, math.ceil(len(rows) / columns))
        caption = 30
        canvas = Image.new("RGB", (columns * cell, lines * (cell + caption)), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for index, row in enumerate(rows):
            left, top = (index % columns) * cell, (index // columns) * (cell + caption)
            try:
                with Image.open(row.path) as opened:
                    picture = opened.convert("RGB")
                    picture.thumbnail((cell - 8, cell - 8))
                    canvas.paste(picture, (left + (cell - picture.width) // 2,
                                           top + caption + (cell - picture.height) // 2))
            except (OSError, ValueError):
                draw.text((left + 8, top + caption + cell // 2), "unreadable", fill="black",
                          font=font)
            colour = (20, 20, 20) if row.correct else (178, 34, 34)
            draw.text((left + 4, top + 2), f"{row.true} -> {row.predicted}"[:40], fill=colour,
                      font=font)
            draw.text((left + 4, top + 15), f"p {row.probability:.2f} · loss {row.loss:.2f}",
                      fill=colour, font=font)
        return canvas

