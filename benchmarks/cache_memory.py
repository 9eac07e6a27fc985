"""What the activation cache costs a machine with one and with two local training processes.

    python -m benchmarks.cache_memory --data UCMerced --strategy freeze-fraction

Each setting runs one epoch of the strategy (feature cache on) as one process, then as two
under torchrun (`--standalone`, gloo), and reads every process's /proc/self/smaps_rollup at
fit start and after the first epoch (the train and val caches filled and read):
- unique (USS): pages only this process maps (a private copy of the cache shows here);
- shared: pages it maps together with others (the machine's one copy of the cache);
- PSS: each page divided by the processes mapping it, so the processes' PSS add up to what
  they cost the machine.
The machine's memory added by the cache is the sum of the processes' PSS growth; the second
process should add almost nothing to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.measured import cpu_label, write_measurement
from finetune.atomic import atomic_write_text
from finetune.data import ImageFolderData
from finetune.data.sample import resolve_named_data
from finetune.data.tree import ImageSplits
from finetune.model.zoo import build_backbone
from finetune.runtime import distributed
from finetune.runtime.memory import trim_heap
from finetune.strategies import parse_strategy
from finetune.train.config import TrainConfig
from finetune.train.events import Callback
from finetune.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "unique", "Private_Dirty": "unique",
          "Shared_Clean": "shared", "Shared_Dirty": "shared"}


def memory() -> dict[str, int]:
    """This process's resident memory in bytes: rss, pss, unique (USS) and shared; freed heap
    is handed back first, so what training freed does not read as held."""
    gc.collect()
    trim_heap()
    sizes = dict.fromkeys(FIELDS.values(), 0)
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in FIELDS:
            sizes[FIELDS[name]] += int(value.split()[0]) * 1024
    return sizes


class MemoryProbe(Callback):
    """Every process's memory at fit start and after the first epoch, and the cache held."""

    every_rank = True

    def __init__(self) -> None:
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.cache_bytes = self.shared_bytes = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.before = memory()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self.after:
            self.after = memory()
            self.cache_bytes = trainer.activations.nbytes
            self.shared_bytes = trainer.activations.shared_nbytes


def measure(args: argparse.Namespace) -> None:
    """One process's epoch (alone or as one of torchrun's); writes rank{R}.json to --out."""
    with distributed.joined("cpu"):
        splits = ImageSplits.scan(resolve_named_data(args.data), val_split=0.2, split_seed=0,
                                  train_per_class=args.per_class, progress=False)
        backbone = build_backbone(args.backbone, len(splits.classes), seed=0)
        data = ImageFolderData(splits, seed=0, batch_size=args.batch_size, num_workers=0,
                               data_augmentation=False, preprocessing=backbone.preprocessing,
                               image_size=args.image_size, progress=False)
        probe = MemoryProbe()
        config = TrainConfig(epochs=1, lr=1e-3, seed=0, device="cpu", precision=args.precision,
                             feature_cache="on", keep_freed_memory=False)
        trainer = Trainer(backbone, parse_strategy(args.strategy), config, [probe])
        trainer.fit(data.train_loader(), data.val_loader())
        result = {"rank": distributed.rank(), "processes": distributed.world_size(),
                  "before": probe.before, "after": probe.after,
                  "cache_bytes": probe.cache_bytes, "shared_bytes": probe.shared_bytes,
                  "images": len(data.train_samples) + len(data.val_samples),
                  "weights": {k: v.tolist() for k, v in backbone.head.state_dict().items()}}
        atomic_write_text(Path(args.out) / f"rank{distributed.rank()}.json",
                          json.dumps(result))


def run_processes(count: int, options: list[str], out: Path, timeout: float = 600
                  ) -> list[dict[str, Any]]:
    """`measure` as `count` local processes (torchrun beyond one); each process's result."""
    out.mkdir(parents=True, exist_ok=True)
    command = ["-m", "benchmarks.cache_memory", "--measure", "--out", str(out), *options]
    if count > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(count), *command]
    threads = max(1, (os.cpu_count() or 1) // count)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{count} process(es) failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(count)]


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine's view of one run: the cache's size, what the processes added in all
    (sum of PSS growth), and per process what grew in unique and in shared pages."""
    def grew(result: dict[str, Any], field: str) -> int:
        return result["after"][field] - result["before"][field]

    return {"processes": len(results), "images": results[0]["images"],
            "cache_bytes": results[0]["cache_bytes"],
            "shared_bytes": results[0]["shared_bytes"],
            "machine_added": sum(grew(r, "pss") for r in results),
            "unique_added": [grew(r, "unique") for r in results],
            "shared_added": [grew(r, "shared") for r in results]}


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    mib = 2**20
    lines = [f"**{title}**", "",
             "| processes | cache (MiB) | machine memory added (MiB, sum of PSS growth) | "
             "per process: unique growth (MiB) | per process: shared growth (MiB) |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['processes']} | {row['cache_bytes'] / mib:.0f} | "
            f"{row['machine_added'] / mib:.0f} | "
            f"{' / '.join(f'{b / mib:.0f}' for b in row['unique_added'])} | "
            f"{' / '.join(f'{b / mib:.0f}' for b in row['shared_added'])} |")
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample", help="an image tree or a named set")
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--strategy", default="freeze-fraction")
    parser.add_argument("--per-class", type=int, default=None,
                        help="training images per class (all by default)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/cache_memory"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.measure:
        measure(args)
        return
    options = ["--data", args.data, "--backbone", args.backbone, "--strategy", args.strategy,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--precision", args.precision]
    if args.per_class is not None:
        options += ["--per-class", str(args.per_class)]
    rows = [summary(run_processes(count, options, args.out / f"{count}"))
            for count in args.processes]
    title = (f"{args.data}, {args.backbone} {args.strategy}, {args.image_size} px, "
             f"{args.precision}, {rows[0]['images']} images cached (train + val); CPU: "
             f"{cpu_label()}")
    write_measurement(args.out, "cache_memory", markdown(rows, title), rows,
                      "benchmarks.cache_memory", argv)


if __name__ == "__main__":
    main()
