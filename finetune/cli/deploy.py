"""`finetune predict` and `finetune export`: use a trained run (`finetune.deploy.inference`,
`finetune.deploy.export`)."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from finetune.atomic import atomic_write_text
from finetune.deploy.export import check_images, export
from finetune.deploy.inference import Classifier, Prediction, find_images, load, load_run
from finetune.errors import DataError

CSV_HEADER = ("path", "rank", "class", "probability", "error")
CHECK_IMAGES = 8  # real images an export is verified on


def run_predict(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.is_dir():  # said before any image is read
        raise DataError(f"--output {args.output} is a folder; give the CSV file to write, "
                        f"e.g. {args.output / 'predictions.csv'}")
    with warnings.catch_warnings(record=True) as caught:  # said once, as a note
        warnings.simplefilter("always")
        classifier = load(args.model, device=args.device, backbone=args.backbone)
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    paths = find_images(args.paths)
    rows, unreadable, started = [], 0, time.perf_counter()
    predictions = classifier.predict_files(paths, top_k=args.top_k, batch_size=args.batch_size,
                                           workers=args.workers, tta=args.tta)
    for prediction in _progress(predictions, len(paths)):
        if prediction.error is not None:
            unreadable += 1
            rows.append((prediction.path, "", "", "", prediction.error))
            continue
        rows += [(prediction.path, rank, name, f"{probability:.6f}", "")
                 for rank, (name, probability) in enumerate(
                     zip(prediction.classes, prediction.probabilities, strict=True), start=1)]
    seconds = time.perf_counter() - started
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    if args.output is None:
        sys.stdout.write(text.getvalue())
    else:
        atomic_write_text(args.output, text.getvalue())
    print(f"{len(paths)} images ({unreadable} unreadable) in {seconds:.1f} s, "
          f"{len(paths) / max(seconds, 1e-9):.1f} images/s"
          + (f" → {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _progress(items: Iterator[Prediction], total: int) -> Iterable[Prediction]:
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, unit="img", file=sys.stderr)


def run_export(args: argparse.Namespace) -> int:
    run = load_run(args.model, args.backbone)
    if run.assumed is not None:
        print(f"note: {run.assumed}; the export embeds that preprocessing", file=sys.stderr)
    sources = args.check or _run_images(run.record)
    images = None
    if sources:  # preprocessed as the run was trained
        classifier = Classifier(run.backbone, run.classes, run.preprocessing, device="cpu")
        images = check_images(classifier, find_images(sources), CHECK_IMAGES)
    done = export(run, args.format, args.output, images=images)
    print(f"wrote {done.path} ({done.format}), verified on {done.checked_on}: max |logit "
          f"difference| {done.max_difference:.2g}"
          + ("" if images is not None else " — pass --check IMAGES to verify on real images"))
    return 0


def _run_images(record: dict | None) -> list[str]:
    """A few of the run's own test (or val) images, when its data folder is here."""
    if record is None:
        return []
    root = Path(record["data"])
    for split in ("test", "val"):
        folder = root / split
        if folder.is_dir():
            try:
                found = find_images([folder])
            except DataError:
                continue
            return [str(p) for p in found[:: max(1, len(found) // CHECK_IMAGES)][:CHECK_IMAGES]]
    return []
