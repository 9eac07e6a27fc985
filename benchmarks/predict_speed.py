"""How fast `finetune predict` classifies image files, against a bare `model(x)` loop over the
same images already decoded and preprocessed — in one run, on this CPU (printed).

    python -m benchmarks.predict_speed                 # Lite0 (ImageNet weights), the sample
    python -m benchmarks.predict_speed --model runs/x --images photos/ --batch-size 32

The ratio is predict's images/s over the bare loop's: what decoding, batching and the
top-k bookkeeping cost on top of the network (the bare loop does none of it). Both run in
fp32 with the memory layout the classifier uses, after one warm-up batch each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from finetune.data.sample import sample_dataset
from finetune.deploy.inference import Classifier, find_images, load
from finetune.model.zoo import build_backbone
from finetune.runtime.precision import machine


def classifier_for(model: str | None) -> Classifier:
    if model:
        return load(model, device="cpu")
    backbone = build_backbone("lite0", 10, "DEFAULT")
    return Classifier(backbone, [f"class{i}" for i in range(10)], backbone.preprocessing,
                      device="cpu", channels_last=True, source="lite0 (ImageNet weights)")


def bare_loop(classifier: Classifier, paths: list[Path], batch_size: int) -> float:
    """Images/s of `model(x)` over preprocessed batches (decoding done beforehand)."""
    tensors = torch.stack([classifier.preprocess(p) for p in paths])
    batches = list(tensors.split(batch_size))
    model = classifier.model
    with torch.inference_mode():
        model(batches[0].contiguous(memory_format=torch.channels_last)
              if classifier.channels_last else batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            if classifier.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            model(batch)
        return len(paths) / (time.perf_counter() - started)


def predict_files(classifier: Classifier, paths: list[Path], batch_size: int,
                  workers: int | None) -> float:
    """Images/s of `Classifier.predict_files` (decoding in threads included)."""
    list(classifier.predict_files(paths[:batch_size], batch_size=batch_size,
                                  workers=workers))  # warm-up
    started = time.perf_counter()
    count = sum(1 for _ in classifier.predict_files(paths, batch_size=batch_size,
                                                    workers=workers))
    return count / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    classifier = classifier_for(args.model)
    paths = find_images(args.images or [sample_dataset()])
    bare = bare_loop(classifier, paths, args.batch_size)
    predicted = predict_files(classifier, paths, args.batch_size, args.workers)
    return {"machine": machine(), "model": classifier.source, "images": len(paths),
            "crop_size": classifier.preprocessing.crop_size, "batch_size": args.batch_size,
            "bare_images_per_s": bare, "predict_images_per_s": predicted,
            "ratio": predicted / bare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_speed",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a run folder, checkpoint or .safetensors export "
                        "(default: Lite0 with its ImageNet weights)")
    parser.add_argument("--images", nargs="+", help="files, folders or globs (default: the "
                        "packaged sample, 360 images)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args)
    cpu = result["machine"]
    print(f"{cpu['cpu']} · {cpu['threads']} threads · {result['model']} · "
          f"{result['images']} images at {result['crop_size']} px, batch "
          f"{result['batch_size']}")
    print(f"bare model(x) on preprocessed tensors: {result['bare_images_per_s']:.1f} img/s · "
          f"finetune predict from files: {result['predict_images_per_s']:.1f} img/s · "
          f"ratio {result['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
