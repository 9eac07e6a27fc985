"""The same fine-tune in our Trainer, a plain PyTorch loop and Lightning, each in its own
process: fit seconds, training images/s, peak memory and test accuracy per framework.

Same data and split (the loaders of `ImageFolderData`: one shuffle order, decoded once), the
same initial weights (the head drawn from the seed before any framework sees the model), Adam
at a fixed lr, fp32 and NCHW (the reference recipe; our `auto` choices are off so that only the
loop differs), full fine-tuning, the same epochs. `ours-auto` is our Trainer as it runs by
default: precision and memory layout chosen by a timed probe (its probe time included).
Lightning needs the `[lightning]` extra.

    python -m benchmarks.peers --data ../shared/data/ucmerced            # 21 classes, 16+4 each
    python -m benchmarks.peers --data DIR --frameworks ours,plain --epochs 1
    python -m benchmarks.peers --data DIR --frameworks ours,ours-auto,lightning --repeats 3

Reported with the CPU named; a ratio is fit seconds of a framework over ours, in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

FRAMEWORKS = ("ours", "plain", "lightning", "ours-auto")


def loaders(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from finetune import FullUnfreeze, ImageFolderData
    from finetune.data import ImageSplits
    from finetune.model.zoo import build_backbone

    splits = ImageSplits.scan(args.data, val_split=0.2, split_seed=0,
                              train_per_class=args.train_per_class, progress=False)
    backbone = build_backbone(args.backbone, len(splits.classes), "DEFAULT", seed=args.seed)
    data = ImageFolderData(splits, seed=args.seed, batch_size=args.batch_size,
                           preprocessing=backbone.preprocessing, image_size=args.image_size,
                           num_workers=0, keep_decoded=True)
    FullUnfreeze().apply(backbone)  # every framework trains everything
    return backbone, data.train_loader(shuffle_seed=args.seed), data.val_loader(), data


def test_accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            right += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return right / total


def run_ours(args: argparse.Namespace, auto: bool = False) -> dict[str, Any]:
    """Our Trainer at the reference recipe, or (`auto`) with the precision and memory layout
    it chooses by timing on this machine (bf16 only where measured faster)."""
    from finetune import FullUnfreeze, TrainConfig, Trainer

    backbone, train, val, data = loaders(args)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                         precision="auto" if auto else "fp32",
                         channels_last="auto" if auto else False, device="cpu")
    trainer = Trainer(backbone, FullUnfreeze(), config)
    started = time.perf_counter()
    trainer.fit(train, val)
    seconds = time.perf_counter() - started
    return {"fit_seconds": seconds, "test_accuracy": test_accuracy(backbone, data.test_loader()),
            "precision": trainer.state.precision, "channels_last": trainer.state.channels_last}


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    backbone, train, val, data = loaders(args)
    model = backbone.model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        if hasattr(train, "sampler") and hasattr(train.sampler, "set_epoch"):
            train.sampler.set_epoch(epoch)
        model.train()
        for images, labels in train:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        test_accuracy(model, val)  # validation each epoch, as the others do
    seconds = time.perf_counter() - started
    return {"fit_seconds": seconds, "test_accuracy": test_accuracy(model, data.test_loader())}


def run_lightning(args: argparse.Namespace) -> dict[str, Any]:
    import lightning

    backbone, train, val, data = loaders(args)
    model, lr = backbone.model, args.lr

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.model(images), labels)

        def validation_step(self, batch: Any, index: int) -> None:
            images, labels = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.model(images), labels))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                    lr=lr)

    trainer = lightning.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                                precision="32-true", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(Module(), train, val)
    seconds = time.perf_counter() - started
    return {"fit_seconds": seconds, "test_accuracy": test_accuracy(model, data.test_loader())}


def one(args: argparse.Namespace) -> None:
    """In a child process: one framework's run, as JSON on the last line of stdout."""
    torch.manual_seed(args.seed)
    runs = {"ours": run_ours, "plain": run_plain, "lightning": run_lightning,
            "ours-auto": lambda a: run_ours(a, auto=True)}
    result = runs[args.one](args)
    images = args.epochs * args.train_images
    result.update(images_per_second=images / result["fit_seconds"],
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=20, help="16 train + 4 val")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each framework; the table shows medians")
    parser.add_argument("--output", type=Path, default=Path("peers.json"))
    parser.add_argument("--one", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--train-images", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    from finetune.data import ImageSplits
    from finetune.runtime.precision import machine

    splits = ImageSplits.scan(args.data, val_split=0.2, split_seed=0,
                              train_per_class=args.train_per_class, progress=False)
    train_images = len(splits.train) // args.batch_size * args.batch_size  # drop_last
    frameworks = args.frameworks.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in frameworks}
    for round_ in range(args.repeats):  # frameworks in turn, each round: drift hits all alike
        for framework in frameworks if round_ % 2 == 0 else frameworks[::-1]:
            command = [sys.executable, "-m", "benchmarks.peers", *sys.argv[1:], "--one",
                       framework, "--train-images", str(train_images)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{framework}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[framework].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {name: {**done_runs[0], **{key: statistics.median(r[key] for r in done_runs)
                                         for key in ("fit_seconds", "images_per_second",
                                                     "peak_rss_mib", "test_accuracy")},
                      "fit_seconds_each": [r["fit_seconds"] for r in done_runs]}
               for name, done_runs in runs.items() if done_runs}
    cpu = machine()["cpu"]
    print(f"CPU: {cpu}; {args.backbone}, full fine-tuning, {len(splits.classes)} classes, "
          f"{len(splits.train)} train images, {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, Adam {args.lr:g}, fp32; median of {args.repeats} run(s)")
    print("| framework | fit (s) | train img/s | peak RSS (MiB) | test acc (%) | fit / ours |")
    print("|---|---:|---:|---:|---:|---:|")
    ours = results.get("ours", {}).get("fit_seconds")
    for framework, result in results.items():
        ratio = f"{result['fit_seconds'] / ours:.2f}x" if ours else "–"
        print(f"| {framework} | {result['fit_seconds']:.1f} | {result['images_per_second']:.1f} "
              f"| {result['peak_rss_mib']:.0f} | {100 * result['test_accuracy']:.1f} | {ratio} |")
    args.output.write_text(json.dumps({"cpu": cpu, "settings": {k: str(v) for k, v in
                                                                vars(args).items()},
                                       "results": results}, indent=2))


if __name__ == "__main__":
    main()
