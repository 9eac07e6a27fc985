"""Does `--compile` (torch.compile of the part that trains) pay on this machine?

For each backbone × strategy, a 3-epoch fit eager and compiled, back to back in one process
on the same split and seed: the fit's seconds (the compile included), the compiled fit's
first epoch beyond its later ones (≈ the compile, shown apart), the steady epoch of each, and
the ratio eager / compiled. Inductor's on-disk caches are off, so every compile is the cold one
a user pays the first time.

    python -m benchmarks.compile_speed                       # Lite0 and ResNet50, 3 strategies
    python -m benchmarks.compile_speed --backbones lite0 --strategies last-layer

ResNet50 trains from random init here (its weights need a download; the timing does not
depend on them). Prints a Markdown table and writes it with the CPU named (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch

from finetune import ImageFolderData, TrainConfig, Trainer, parse_strategy
from finetune.data import ImageSplits
from finetune.data.sample import sample_dataset
from finetune.model.zoo import build_backbone
from finetune.runtime.precision import machine

WEIGHTS = {"lite0": "DEFAULT", "resnet50": None}


def fit_seconds(backbone_name: str, strategy: str, compiled: bool, args: argparse.Namespace
                ) -> dict[str, float]:
    torch._dynamo.reset()
    splits = ImageSplits.scan(sample_dataset(), val_split=0.2, split_seed=0,
                              train_per_class=args.train_per_class, progress=False)
    backbone = build_backbone(backbone_name, len(splits.classes), WEIGHTS[backbone_name],
                              seed=0)
    data = ImageFolderData(splits, seed=0, batch_size=args.batch_size,
                           preprocessing=backbone.preprocessing, image_size=args.image_size,
                           num_workers=0)
    config = TrainConfig(epochs=args.epochs, lr=5e-4, seed=0, precision="fp32",
                         channels_last=False, compile=compiled)
    trainer = Trainer(backbone, parse_strategy(strategy), config)
    started = time.perf_counter()
    history = trainer.fit(data.train_loader(), data.val_loader())
    seconds = time.perf_counter() - started
    epochs = history["epoch_seconds"]
    return {"fit_seconds": seconds, "first_epoch": epochs[0],
            "steady_epoch": statistics.fmean(epochs[1:]) if len(epochs) > 1 else epochs[0],
            "val_accuracy": history["val_accuracy"][-1],
            "cached": trainer.state.cached_prefix is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="lite0,resnet50")
    parser.add_argument("--strategies", default="last-layer,freeze-80,full-unfreeze")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("compile_speed.json"))
    args = parser.parse_args()
    cpu = machine()["cpu"]
    rows = []
    print(f"CPU: {cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print("| backbone | strategy | eager fit (s) | compiled fit (s) | eager / compiled | "
          "compile ≈ (s) | steady epoch eager / compiled (s) | cached prefix |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for backbone in args.backbones.split(","):
        for strategy in args.strategies.split(","):
            eager = fit_seconds(backbone, strategy, False, args)
            fast = fit_seconds(backbone, strategy, True, args)
            row = {"backbone": backbone, "strategy": strategy, "eager": eager, "compiled": fast,
                   "ratio": eager["fit_seconds"] / fast["fit_seconds"],
                   "compile_seconds": fast["first_epoch"] - fast["steady_epoch"]}
            rows.append(row)
            print(f"| {backbone} | {strategy} | {eager['fit_seconds']:.1f} | "
                  f"{fast['fit_seconds']:.1f} | {row['ratio']:.2f}x | "
                  f"{row['compile_seconds']:.1f} | {eager['steady_epoch']:.2f} / "
                  f"{fast['steady_epoch']:.2f} | {'yes' if eager['cached'] else 'no'} |",
                  flush=True)
    args.output.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__,
                                       "settings": vars(args) | {"output": str(args.output)},
                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
