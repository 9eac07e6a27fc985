"""A plan on paper for a large dataset on many machines, from costs measured here.

    python -m benchmarks.scale_plan --backbone resnet50 --images 2686843 --val-images 100000 \\
        --nodes 8 --gpus-per-node 8 --node-ram-gb 1024

For each depth the advisor would try (nothing frozen, then frozen through each group) it
finds the activation cache's cut, the bytes one image's activations take there (fp32 and
bf16), and times on this device, per image: the frozen prefix's forward (paid once, to fill
the cache), a training step of what trains on cached activations, and a training step of
the whole model (what an uncached epoch costs). The plan multiplies them out: the cache per
machine (one copy per machine, `docs/distributed.md`), whether it fits the RAM or needs a
spill to local disk, the fill time and the time of a cached and an uncached epoch with every
process as fast as this device. Run it on one GPU of the target machines for their figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.measured import cpu_label, write_measurement
from finetune.cache.plan import plan_cut
from finetune.model.zoo import build_backbone
from finetune.tuning.advisor import depth_strategies

RAM_SHARE = 0.5  # of a node's RAM the cache may take: the rest is the processes' own


def best_seconds(work: Callable[[], Any], rounds: int, device: torch.device) -> float:
    """The fastest of `rounds` timings after one warm-up: load only ever adds time."""
    times = []
    for index in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - started)
    return min(times)


def measure_depths(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per depth: cut label, activation bytes per image, and seconds per image of the prefix
    forward, a cached training step and an uncached one."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = build_backbone(args.backbone, args.classes, weights=None, seed=0).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    rows = []
    for name, strategy, spec in depth_strategies(backbone):
        strategy.apply(backbone)
        backbone.train()
        cut, reason = plan_cut(backbone)
        trainable = [p for p in backbone.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-4)

        def step(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(forward(inputs), labels)
            loss.backward()
            optimizer.step()

        full = best_seconds(lambda: step(backbone, images), args.rounds, device)
        row = {"depth": name, "strategy": spec, "cut": cut.label if cut else None,
               "uncached_reason": None if cut else reason,
               "trainable_params": sum(p.numel() for p in trainable),
               "full_step_s": full / args.batch_size}
        if cut is not None:
            prefix, suffix = cut.graph.prefix, cut.graph.suffix
            with torch.no_grad(), autocast:
                stored = prefix(images)
            row["bytes_fp32"] = stored[0].numel() * 4
            row["bytes_bf16"] = stored[0].numel() * 2

            def forward_prefix(prefix: Any = prefix) -> None:
                with torch.no_grad(), autocast:
                    prefix(images)

            row["prefix_s"] = best_seconds(forward_prefix, args.rounds, device) / args.batch_size
            row["cached_step_s"] = best_seconds(
                lambda suffix=suffix, stored=stored: step(suffix, stored.detach()),
                args.rounds, device) / args.batch_size
        rows.append(row)
    return rows


def plan(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The measured costs multiplied out for the target: all images, all processes."""
    processes = args.nodes * args.gpus_per_node
    cached_images = args.images + args.val_images
    out = []
    for row in rows:
        entry = {**row, "processes": processes}
        entry["uncached_epoch_h"] = args.images * row["full_step_s"] / processes / 3600
        if row.get("cut"):
            per_node = cached_images * row[f"bytes_{args.cache_precision}"]
            entry["cache_per_node_gb"] = per_node / 1e9
            entry["cache_where"] = ("RAM" if per_node <= RAM_SHARE * args.node_ram_gb * 1e9
                                    else "local disk (activation_cache_dir)")
            entry["fill_h"] = cached_images * row["prefix_s"] / processes / 3600
            entry["cached_epoch_h"] = args.images * row["cached_step_s"] / processes / 3600
        out.append(entry)
    return out


def markdown(entries: list[dict[str, Any]], args: argparse.Namespace, where: str) -> str:
    lines = [f"**{args.backbone}, {args.image_size} px, {args.images:,} training + "
             f"{args.val_images:,} validation images, {args.nodes} machines × "
             f"{args.gpus_per_node} processes; per-image costs measured on {where}**", "",
             f"| frozen through | cache cut | MB / image (fp32 / bf16) | cache per machine "
             f"({args.cache_precision}, GB) | where | fill (h) | cached epoch (h) | "
             "uncached epoch (h) | step cost cached / uncached |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e.get("cut"):
            lines.append(
                f"| {e['depth']} | {e['cut']} | {e['bytes_fp32'] / 1e6:.3g} / "
                f"{e['bytes_bf16'] / 1e6:.3g} | {e['cache_per_node_gb']:,.0f} | "
                f"{e['cache_where']} | {e['fill_h']:.2g} | {e['cached_epoch_h']:.2g} | "
                f"{e['uncached_epoch_h']:.2g} | {e['cached_step_s'] / e['full_step_s']:.2f} |")
        else:
            lines.append(f"| {e['depth']} | none ({e['uncached_reason']}) | | | | | | "
                         f"{e['uncached_epoch_h']:.2g} | 1 |")
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_plan",
                                description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--images", type=int, default=2_686_843, help="training images")
    p.add_argument("--val-images", type=int, default=100_000)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--node-ram-gb", type=float, default=1024)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="autocast of the timed steps")
    p.add_argument("--cache-precision", choices=("fp32", "bf16"), default="bf16",
                   help="the activations' dtype on the target (bf16 under bf16 autocast)")
    p.add_argument("--out", type=Path, default=Path("runs/scale_plan"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    entries = plan(measure_depths(args), args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" \
        else None
    where = f"{gpu or cpu_label()}, {args.precision}, batch {args.batch_size}"
    write_measurement(args.out, "scale_plan", markdown(entries, args, where), entries,
                      "benchmarks.scale_plan", argv)


if __name__ == "__main__":
    main()
