"""A short check of the GPU path, for a machine with a CUDA card:

    python -m benchmarks.gpu_check            # about a minute on one GPU
    python -m benchmarks.gpu_check --device cuda:1 --batch 128

It prints the card, its compute capability and the precision `precision="auto"` picks for it
(bf16 from capability 8.0, else fp16 with a gradient scaler); the training throughput of a
ResNet-18 (random weights, 224 px, full fine-tune) in fp32 and in the chosen precision; then a
tiny `Trainer.fit` (cosine schedule with warm-up, 2-batch accumulation, clipping, pinned
loader) straight for 2 epochs and again cut after epoch 1 and resumed, and how far the two
runs' weights are apart (cuDNN kernels are not bit-deterministic, so a small difference is
expected; a large one is a resume bug). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, FullUnfreeze, TrainConfig, Trainer
from finetune.callbacks import Callback, Checkpoint
from finetune.runtime.precision import cuda_precision
from finetune.train.step import OptimizerStep

# weights of a resumed fit may differ from the straight one's by cuDNN's non-determinism only
RESUME_TOLERANCE = 1e-3


def throughput(device: torch.device, precision: str, batch: int, steps: int) -> float:
    """Images/s of full fine-tuning steps (after 2 warm-up steps) of a random ResNet-18."""
    backbone = Backbone.from_torchvision("resnet18", 10, weights=None).to(device)
    backbone.to(memory_format=torch.channels_last)
    step = OptimizerStep(torch.nn.CrossEntropyLoss(), device=device, precision=precision)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)

    for index in range(2 + steps):
        if index == 2:
            torch.cuda.synchronize(device)
            started = time.perf_counter()
        step(optimizer, backbone, images, labels, step=index, where=f"step {index}")
    torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - started)


class StopAfter(Callback):
    """Ends a run after `epoch`, as a crash would, but after the checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        trainer.state.should_stop = trainer.state.epoch >= self.epoch


def resnet18(num_classes: int) -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_torchvision("resnet18", num_classes, weights=None)


def fit_and_resume(device: torch.device, folder: Path, size: int = 64,
                   build: Callable[[int], Backbone] = resnet18) -> float:
    """Largest weight difference between a straight 2-epoch fit and 1 epoch + resume of
    `build(4)`, on 64 random `size`-px images of 4 classes."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (64,), generator=generator)
    images = torch.randn(64, 3, size, size, generator=generator) + labels.view(-1, 1, 1, 1)
    data = TensorDataset(images, labels)
    config = TrainConfig(epochs=2, lr=1e-3, device=str(device), schedule="cosine", warmup=2,
                         accumulate_steps=2, max_grad_norm=1.0, feature_cache="off")

    def run(callbacks: list[Callback], resume: Path | None = None) -> Trainer:
        backbone = build(4)
        loader = DataLoader(data, batch_size=8, shuffle=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(1))
        trainer = Trainer(backbone, FullUnfreeze(), config, callbacks)
        trainer.fit(loader, resume=resume)
        return trainer

    straight = run([])
    print(f"fit: precision {straight.state.precision}, channels_last "
          f"{straight.state.channels_last}, final train loss "
          f"{straight.history['train_loss'][-1]:.4f}, scaler "
          f"{'on' if straight.step.scaler is not None else 'off'}")
    checkpoint = Checkpoint(folder, monitor="train_loss", mode="min")
    run([checkpoint, StopAfter(0)])
    resumed = run([], resume=checkpoint.last_path)
    a, b = straight.backbone.model.state_dict(), resumed.backbone.model.state_dict()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to "
              "check — run this where a GPU is.")
        return 0
    device = torch.device(args.device)
    capability = torch.cuda.get_device_capability(device)
    chosen = cuda_precision(capability)
    print(f"{torch.cuda.get_device_name(device)}: compute capability "
          f"{capability[0]}.{capability[1]}, precision='auto' picks {chosen} "
          f"(torch.cuda.is_bf16_supported(): {torch.cuda.is_bf16_supported()})")
    rates = {p: throughput(device, p, args.batch, args.steps) for p in ("fp32", chosen)}
    print(f"resnet18 full fine-tune, batch {args.batch}, 224 px: fp32 {rates['fp32']:.0f} "
          f"images/s, {chosen} {rates[chosen]:.0f} images/s "
          f"({rates[chosen] / rates['fp32']:.2f}x)")
    with tempfile.TemporaryDirectory() as folder:
        difference = fit_and_resume(device, Path(folder))
    verdict = "ok" if difference <= RESUME_TOLERANCE else "TOO LARGE"
    print(f"resume: largest weight difference to the straight run {difference:.2e} ({verdict})")
    return 0 if difference <= RESUME_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

