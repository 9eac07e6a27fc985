"""Training throughput per strategy: the loop users write against the library's Trainer.

    python -m benchmarks.throughput --backbone resnet50 \
        --strategies last-layer,freeze-80,full-unfreeze
    python -m benchmarks.throughput --backbone lite0 --strategies last-layer,freeze-80

Both sides train the same randomly initialised backbone (speed does not depend on the weights)
on the same random images, in one process:

- naive: fp32, NCHW, the full forward every step, `requires_grad=False` on the parameters the
  strategy freezes, Adam over the rest — the loop from the tutorials;
- library: `Trainer` with its defaults (precision and memory format by timed probes,
  activation cache, glibc malloc keeping freed memory).

The table is headed by the CPU and its kind — native bf16 (AVX512-BF16 / AMX) or not — since
the ratios differ between the two.

It prints images/s for the naive epoch, the library's first epoch (which fills the cache) and
its later epochs, the ratios, and minor page faults per step (an allocator that returns memory
to the OS every step shows up there). On a shared machine the load can change between the
naive and the library runs, which skews wall-time ratios; the ratios of the process's CPU time
per image (user + system, `time.process_time`) are printed beside them, since they move far
less with the load.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, TrainConfig, Trainer, parse_strategy
from finetune.callbacks import Callback
from finetune.model.zoo import build_backbone
from finetune.runtime.precision import machine
from finetune.strategies import FreezeStrategy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--strategies", nargs="+",
                        default=["last-layer", "freeze-80", "full-unfreeze"],
                        help="comma- or space-separated, as finetune compare takes them")
    parser.add_argument("--images", type=int, default=64, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="library epochs (≥ 2)")
    parser.add_argument("--naive-epochs", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 fills the cache, later ones use it")
    args.strategies = [spec for item in args.strategies for spec in item.split(",") if spec]
    for spec in args.strategies:
        try:
            make_strategy(spec)
        except ValueError as error:
            parser.error(f"--strategies: {error}")
    return args


def make_strategy(spec: str) -> FreezeStrategy:
    """A registered strategy or preset (`freeze-80`), with `:key=value` options."""
    return parse_strategy(spec)


def make_backbone(name: str, num_classes: int) -> Backbone:
    """Random weights (speed does not depend on them), the same for every run."""
    torch.manual_seed(0)
    return build_backbone(name, num_classes, weights=None)


def make_loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.images,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def naive_epochs(backbone: Backbone, strategy: FreezeStrategy, loader: DataLoader,
                 epochs: int) -> dict[str, float]:
    """The loop users write: freeze by requires_grad, fp32, NCHW, full forward each step."""
    trainable = set(strategy.trainable(backbone, 0))
    for name, parameter in backbone.model.named_parameters():
        parameter.requires_grad_(name in trainable)
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    backbone.train()
    seconds, steps, faults, cpu = 0.0, 0, minor_faults(), time.process_time()
    for _ in range(epochs):
        start = time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad()
            loss_fn(backbone(images), labels).backward()
            optimizer.step()
            steps += 1
        seconds += time.perf_counter() - start
    images = epochs * len(loader.dataset)
    return {"images_per_s": images / seconds, "faults_per_step": (minor_faults() - faults) / steps,
            "images_per_cpu_s": images / (time.process_time() - cpu)}


class FaultCounter(Callback):
    """Minor page faults and process CPU seconds of each epoch (the Trainer's history has its
    wall seconds)."""

    def __init__(self) -> None:
        self.faults: list[int] = []
        self.cpu_seconds: list[float] = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._faults, self._cpu = minor_faults(), time.process_time()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.faults.append(minor_faults() - self._faults)
        self.cpu_seconds.append(time.process_time() - self._cpu)


def library_epochs(backbone: Backbone, strategy: FreezeStrategy, loader: DataLoader,
                   args: argparse.Namespace) -> dict[str, Any]:
    counter = FaultCounter()
    trainer = Trainer(backbone, strategy,
                      TrainConfig(epochs=args.epochs, precision=args.precision), [counter])
    history = trainer.fit(loader)
    seconds, images = history["train_seconds"], history["train_images"]
    steps = len(loader) * (len(seconds) - 1)
    return {
        "first_images_per_s": images[0] / seconds[0],
        "later_images_per_s": sum(images[1:]) / sum(seconds[1:]),
        "faults_per_step": sum(counter.faults[1:]) / steps,
        "first_images_per_cpu_s": images[0] / counter.cpu_seconds[0],
        "later_images_per_cpu_s": sum(images[1:]) / sum(counter.cpu_seconds[1:]),
        "precision": trainer.state.precision,
        "channels_last": trainer.state.channels_last,
        "cached_at": trainer.state.cached_prefix,
        "uncached_reason": trainer.state.uncached_reason,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All naive runs first: the Trainer tunes the process-wide allocator at fit start
    (`keep_freed_memory`), which would otherwise speed up later naive runs too."""
    naive = {name: naive_epochs(make_backbone(args.backbone, args.num_classes),
                                make_strategy(name), make_loader(args), args.naive_epochs)
             for name in args.strategies}
    rows = []
    for name in args.strategies:
        library = library_epochs(make_backbone(args.backbone, args.num_classes),
                                 make_strategy(name), make_loader(args), args)
        baseline = naive[name]["images_per_s"]
        rows.append({"strategy": name, "naive": naive[name], "library": library,
                     "ratio_first": library["first_images_per_s"] / baseline,
                     "ratio_later": library["later_images_per_s"] / baseline,
                     "cpu_ratio_first": library["first_images_per_cpu_s"]
                     / naive[name]["images_per_cpu_s"],
                     "cpu_ratio_later": library["later_images_per_cpu_s"]
                     / naive[name]["images_per_cpu_s"]})
        print(format_row(rows[-1]), flush=True)
    return {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows}


def cpu_kind(info: dict[str, Any]) -> str:
    """Native bf16 or not, and why not when an ISA cap hides instructions the CPU has."""
    if info["native_bf16"]:
        return "CPU with native bf16"
    capped = ""
    if info.get("isa_cap") and {"avx512_bf16", "amx_bf16"} & set(info["flags"]):
        capped = f"limited by ONEDNN_MAX_CPU_ISA={info['isa_cap']}: "
    return f"CPU without native bf16 ({capped}bf16 emulated, fp32 is faster)"


HEADER = ("| strategy | naive img/s | library epoch 1 img/s | library epoch 2+ img/s | "
          "ratio epoch 1 | ratio epoch 2+ | CPU-time ratio epoch 1 · 2+ | precision | "
          "cached up to | faults/step naive → lib |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict[str, Any]) -> str:
    naive, library = row["naive"], row["library"]
    return (f"| {row['strategy']} | {naive['images_per_s']:.2f} | "
            f"{library['first_images_per_s']:.2f} | {library['later_images_per_s']:.1f} | "
            f"{row['ratio_first']:.1f}× | {row['ratio_later']:.1f}× | "
            f"{row['cpu_ratio_first']:.1f}× · {row['cpu_ratio_later']:.1f}× | "
            f"{library['precision']}"
            f"{' + channels_last' if library['channels_last'] else ''} | "
            f"{library['cached_at'] or '—'} | {naive['faults_per_step']:.0f} → "
            f"{library['faults_per_step']:.0f} |")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine()
    print(f"{info['cpu']} · {cpu_kind(info)} · {info['threads']} threads · "
          f"{', '.join(info['flags'])} · torch {info['torch']} · {args.backbone} · "
          f"{args.images} images of {args.image_size}px · batch {args.batch_size}")
    print(HEADER)
    results = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
