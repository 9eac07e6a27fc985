"""What each freezing strategy costs relative to FullUnfreeze: trainable parameters and the
time of one training step (forward + backward + SGD step), measured in one run.

    python -m benchmarks.strategy_cost                 # ResNet50, batch 8, 224 px, random weights
    python -m benchmarks.strategy_cost --rounds 5 --arch resnet18

Strategies are timed in interleaved rounds (each round times every strategy once) and the
fastest round is reported: load from other processes only ever adds time, so the minimum is
the least disturbed figure. Phases identical to another row by construction are not repeated:
gradual-unfreeze at epoch 0 and the lp-ft probe train exactly what last-layer trains; their
last phases train exactly what full-unfreeze trains (with other lr multipliers).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from finetune.model.backbone import Backbone
from finetune.strategies import (
    BitFit,
    DiscriminativeLR,
    FreezeAllBut,
    FreezeFraction,
    FreezeStrategy,
    FullUnfreeze,
    GradualUnfreeze,
    LastLayerOnly,
    LinearProbeThenFinetune,
    LoRA,
)

# (label, strategy, epoch); the first row is the reference.
ROWS: list[tuple[str, FreezeStrategy, int]] = [
    ("full-unfreeze", FullUnfreeze(), 0),
    ("last-layer", LastLayerOnly(), 0),
    ("freeze-fraction 0.8 (tensors)", FreezeFraction(0.8), 0),
    ("gradual-unfreeze every=1, epoch 2", GradualUnfreeze(), 2),
    ("lp-ft fine-tune phase", LinearProbeThenFinetune(), 1),
    ("discriminative-lr 0.5", DiscriminativeLR(decay=0.5), 0),
    ("bitfit", BitFit(), 0),
    ("freeze-all-but layer4", FreezeAllBut(groups=("layer4",)), 0),
    ("freeze-all-but layer1", FreezeAllBut(groups=("layer1",)), 0),
    ("lora r=8", LoRA(r=8), 0),
]


def step_seconds(backbone: Backbone, strategy: FreezeStrategy, epoch: int,
                 images: torch.Tensor, labels: torch.Tensor) -> float:
    strategy.apply(backbone, epoch)
    backbone.train()
    optimizer = torch.optim.SGD(strategy.param_groups(backbone, 1e-3, epoch))
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(backbone(images), labels).backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shared = Backbone.from_torchvision(args.arch, num_classes=10, weights=None)
    lora = Backbone.from_torchvision(args.arch, num_classes=10, weights=None)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))

    def backbone_for(strategy: FreezeStrategy) -> Backbone:
        return lora if isinstance(strategy, LoRA) else shared

    params = {label: strategy.apply(backbone_for(strategy), epoch).trainable_params
              for label, strategy, epoch in ROWS}
    times: dict[str, list[float]] = {label: [] for label, _, _ in ROWS}
    for round_ in range(args.rounds + 1):
        for label, strategy, epoch in ROWS:
            seconds = step_seconds(backbone_for(strategy), strategy, epoch, images, labels)
            if round_:  # round 0 warms up allocators and kernels
                times[label].append(seconds)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.arch}, random weights, batch {args.batch_size}, {args.image_size} px, fp32, "
          f"{torch.get_num_threads()} threads, fastest of {args.rounds} interleaved rounds, "
          f"load average {load:.1f}")
    reference_params, reference_time = params[ROWS[0][0]], min(times[ROWS[0][0]])
    print(f"| {'strategy':<36} | {'trainable params':>16} | {'% of full':>9} | "
          f"{'step s':>6} | {'time vs full':>12} |")
    print(f"|{'-' * 38}|{'-' * 18}:|{'-' * 10}:|{'-' * 7}:|{'-' * 13}:|")
    for label, _, _ in ROWS:
        fastest = min(times[label])
        print(f"| {label:<36} | {params[label]:>16,} | "
              f"{100 * params[label] / reference_params:>8.2f}% | {fastest:>6.2f} | "
              f"{fastest / reference_time:>12.2f} |")


if __name__ == "__main__":
    main()
