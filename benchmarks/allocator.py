"""How the memory allocator changes CPU training speed: the same steps under several settings.

    python -m benchmarks.allocator --backbone resnet50 --steps 4

glibc's malloc hands large blocks (activations, gradients) back to the kernel when they are
freed, so the next step faults every page in again. Each setting runs in its own process (the
environment must be set before Python starts); the table reports seconds and minor page faults
per training step, and the speed relative to the default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RUNTIME_FLAG = "FINETUNE_BENCH_KEEP_FREED_MEMORY"
SETTINGS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "glibc, environment": {
        # Serve big blocks from the heap (not mmap) and never trim it back to the kernel.
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
        "MALLOC_TOP_PAD_": str(256 << 20),
    },
    "glibc, keep_freed_memory()": {RUNTIME_FLAG: "1"},  # what the Trainer does at fit start
}
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def measure(backbone: str, steps: int, batch: int, size: int, precision: str) -> dict:
    """Seconds and minor faults per full fine-tuning step (after one warm-up step)."""
    import torch

    from finetune import Backbone
    from finetune.runtime.memory import keep_freed_memory
    from finetune.runtime.precision import autocast

    if os.environ.get(RUNTIME_FLAG) == "1" and not keep_freed_memory():
        raise RuntimeError("mallopt is not available here (not glibc)")

    torch.manual_seed(0)
    model = Backbone.from_torchvision(backbone, 10, weights=None).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    device = torch.device("cpu")
    times, faults = [], []
    for step in range(steps + 1):
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        if step:  # the first step allocates everything once
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"seconds_per_step": sorted(times)[len(times) // 2],
            "faults_per_step": sum(faults) / len(faults)}


def settings() -> dict[str, dict[str, str]]:
    found = dict(SETTINGS)
    for name, library in (("jemalloc", JEMALLOC), ("tcmalloc", TCMALLOC)):
        if library.exists():
            found[name] = {"LD_PRELOAD": str(library)}
    return found


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.backbone, args.steps, args.batch_size, args.image_size,
                                 args.precision)))
        return []
    child = [sys.executable, "-m", "benchmarks.allocator", "--child", "--backbone",
             args.backbone, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--image-size", str(args.image_size), "--precision", args.precision]
    print(f"{args.backbone}, full fine-tune, batch {args.batch_size}, {args.image_size}px, "
          f"{args.precision} + channels_last, median of {args.steps} steps")
    print("| allocator | s/step | minor faults/step | speed vs default |\n|---|---|---|---|")
    rows: list[dict] = []
    for name, env in settings().items():
        output = subprocess.run(child, env={**os.environ, **env}, check=True,
                                capture_output=True, text=True).stdout
        row = {"allocator": name, "env": env, **json.loads(output.strip().splitlines()[-1])}
        rows.append(row)
        speed = rows[0]["seconds_per_step"] / row["seconds_per_step"]
        print(f"| {name} | {row['seconds_per_step']:.2f} | {row['faults_per_step']:,.0f} | "
              f"{speed:.2f}× |", flush=True)
    return rows


if __name__ == "__main__":
    main()
