"""MODEL_CARD.md for a trained run, in the Hugging Face model card layout (YAML front matter,
then model details, uses and limitations, data, training, evaluation, cost, how to use): what
the next reader of a run folder needs, from the run's real figures."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_write_text
from finetune.stats.metrics import EvaluationReport
from finetune.stats.significance import Bootstrap
from finetune.strategies import FreezeReport
from finetune.train.recipes import describe
from finetune.train.state import History

CARD_FILE = "MODEL_CARD.md"


def model_card(*, record: dict[str, Any], report: EvaluationReport, history: History,
               freeze: FreezeReport | None, counts: dict[str, int], precision: str,
               device: str, cpu: str) -> str:
    """The card's Markdown. `record` is the run's run.json; `report` the test evaluation (its
    predictions give the 95% interval); `counts` the images per split ("train", "val",
    "test") and in the smallest training class ("smallest_train_class")."""
    classes: Sequence[str] = record["classes"]
    name = Path(record["data"]).name or record["data"]
    cli = record.get("cli", {})
    low, high = _interval(report)
    accuracy = float(report.accuracy)
    seconds = sum(history["epoch_seconds"]) if len(history) else 0.0
    trainable = (f"{freeze.trainable_params:,} of {freeze.total_params:,} parameters "
                 f"({100 * freeze.trainable_fraction:.1f}%)" if freeze is not None else "–")
    lr = record["tuning"]["chosen"] if record.get("tuning") else cli.get("lr")
    tuned = " (chosen on the validation split)" if record.get("tuning") else ""
    per_class = "\n".join(
        f"| {markdown_text(c)} | {100 * float(a):.1f} | {int(n)} |"
        for c, a, n in zip(classes, report.per_class_accuracy, report.support, strict=True))
    smallest = counts.get("smallest_train_class", 0)
    front = {"library_name": "finetune", "pipeline_tag": "image-classification",
             "tags": ["image-classification", "finetune", record["backbone_name"]],
             "metrics": ["accuracy"],
             "model-index": [{"name": f"{record['backbone_name']}-{name}", "results": [{
                 "task": {"type": "image-classification"},
                 "dataset": {"name": name, "type": "imagefolder"},
                 "metrics": [{"type": "accuracy", "name": "test accuracy",
                              "value": round(accuracy, 4)}]}]}]}
    return f"""---
{_yaml(front)}---

# {record['backbone_name']} fine-tuned on {name}

## Model details
- Backbone: `{record['backbone']}` ({record['backbone_name']}), starting weights
  `{record.get('weights')}`; a new head for {len(classes)} classes.
- Strategy: `{record['strategy'].get('class')}` {json.dumps(record['strategy'].get('options', {}))}
  — {trainable} trained.
- Files: `best.pt` / `last.pt` (weights-only checkpoints), `run.json` (how to rebuild it).

## Uses and limitations
Classifies images into: {', '.join(markdown_text(c) for c in classes)}. It has seen nothing else: an
image of another kind still gets one of these labels, with a probability that does not say
so. Trained on {counts.get('train', 0):,} images ({smallest:,} in the smallest class);
accuracy on images unlike these (other cameras, seasons, places) is unmeasured. The test
figure below comes from {counts.get('test', 0):,} images: its 95% interval says how far it
can be off from that alone.

## Training data
`{record['data']}`: {len(classes)} classes; {counts.get('train', 0):,} train,
{counts.get('val', 0):,} validation (split {record['val_split']:g} of each class, seed
{record['seed']}), {counts.get('test', 0):,} test images.

## Training procedure
{len(history)} epochs, Adam, lr {lr}{tuned},
batch size {cli.get('batch_size')}, image size {record['preprocessing']['crop_size']} px
(resize {record['preprocessing']['resize_size']}, mean {record['preprocessing']['mean']},
std {record['preprocessing']['std']}), {'; '.join(describe(cli)) or 'no augmentation'},
precision {precision}, seed {record['seed']}.

## Evaluation
Test accuracy **{100 * accuracy:.1f}%** (95% interval {100 * low:.1f}–{100 * high:.1f}%,
bootstrap over the test images), macro F1 {report.macro_f1:.3f}.

| class | test accuracy (%) | images |
|---|---:|---:|
{per_class}

## Cost
{len(history)} epochs in {seconds:.0f} s on {device} ({cpu}); {trainable} trained.

## How to use
```bash
finetune predict RUN_DIR photos/ --top-k 3 --output predictions.csv
finetune export RUN_DIR --format onnx --output model.onnx
```
```python
import finetune
classifier = finetune.load("RUN_DIR")
classifier.predict(["photo.jpg"], top_k=3)
```
"""


def markdown_text(text: str) -> str:
    """A class name as literal text in a Markdown table cell or sentence: one line, HTML
    escaped, and Markdown's own characters (a `|` would split a table row) backslashed."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", text)


def write_model_card(folder: Path, **fields: Any) -> Path:
    return atomic_write_text(Path(folder) / CARD_FILE, model_card(**fields))


def _interval(report: EvaluationReport) -> tuple[float, float]:
    if report.targets is None or report.predictions is None or not len(report.targets):
        return float("nan"), float("nan")
    estimate = Bootstrap(targets=report.targets, num_classes=len(report.support)).accuracy(
        report.predictions)
    return estimate.low, estimate.high


def _yaml(value: Any, indent: int = 0) -> str:
    """The small YAML subset a model card's front matter needs (mappings, lists, scalars)."""
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
    else:
        for item in value:
            if isinstance(item, dict):
                body = _yaml(item, indent + 1).lstrip()
                lines.append(f"{pad}- {body}")
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
    return "\n".join(line.rstrip("\n") for line in lines) + "\n"
