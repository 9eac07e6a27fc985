"""The lr search under torchrun, many times over: does a data-parallel search ever abort or hang?

Each repetition starts a fresh `torchrun --standalone --nproc_per_node N` of a command that
runs the search (default: `finetune train --lr auto` on the packaged sample at 64 px, in turn
a linear probe on the shared activation cache, whose lowest lr stops at the peek, and a full
fine-tune), bounded by a timeout, and records how it ended: ok, abort (a rank died of
SIGABRT), failed (any other exit status) or hang (killed at the timeout).

    python -m benchmarks.search_stress --repeats 50 --timeout 120

`--command compare` runs `finetune compare --nproc 2 --tune lr` on the sample instead (two
rows, each tuned). `--trace` makes each rank's collectives visible: a `sitecustomize` wraps
torch.distributed's collectives to log each call (name, tensor shapes, our caller) per rank,
and a run whose ranks issued different sequences counts as `different-collectives` (traces
kept). `--debug` sets `TORCH_DISTRIBUTED_DEBUG=INFO`, `TORCH_CPP_LOG_LEVEL=INFO`
and `PYTHONFAULTHANDLER=1` for every rank (a Python traceback of every thread where a rank
dies of a signal) and keeps every run's output; otherwise only failed runs' output is kept,
under `--output`, with `summary.json`. (`TORCH_DISTRIBUTED_DEBUG=DETAIL` is no use here: with
torch 2.14.1 and gloo, building any DistributedDataParallel under it segfaults.) Not part of
the test suite: 50 repetitions took 15 minutes on 2 cores (median 18 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.measured import cpu_label

TRAIN = ["-m", "finetune", "train", "--data", "sample", "--backbone", "lite0",
         "--epochs", "2", "--image-size", "64", "--batch-size", "8", "--val-split", "0.2",
         "--lr", "auto", "--workers", "0"]
STRATEGIES = ("last-layer", "full-unfreeze")
COMPARE = ["-m", "finetune", "compare", "--data", "sample", "--backbone", "lite0",
           "--strategies", "last-layer,full-unfreeze", "--epochs", "2", "--image-size", "64",
           "--batch-size", "8", "--tune", "lr"]
DEBUG_ENV = {"TORCH_DISTRIBUTED_DEBUG": "INFO", "TORCH_CPP_LOG_LEVEL": "INFO",
             "PYTHONFAULTHANDLER": "1"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "gather", "scatter", "reduce",
               "reduce_scatter", "all_to_all")
# Loaded by every rank as `sitecustomize` (--trace): each collective torch.distributed's Python
# API issues, with its tensors' shapes and our caller, one line each in trace-rank<R>.txt.
# DDP's gradient buckets are reduced inside C++ and do not appear.
TRACER = """
import functools, os, sys
if "LOCAL_RANK" in os.environ and os.environ.get("FINETUNE_TRACE_DIR"):
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    log = open(os.path.join(os.environ["FINETUNE_TRACE_DIR"],
                            "trace-rank" + os.environ["RANK"] + ".txt"), "w", buffering=1)

    def shapes(value):
        if hasattr(value, "shape"):
            return [tuple(value.shape)]
        if isinstance(value, (list, tuple)):
            return [s for item in value for s in shapes(item)]
        return []

    def caller():
        frame = sys._getframe(2)
        while frame and ("/torch/" in frame.f_code.co_filename
                         or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"

    def traced(name, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            log.write(f"{name} {shapes(args)} @ {caller()}\\n")
            return original(*args, **kwargs)
        return call

    for name in NAMES:
        if hasattr(c10d, name):
            wrapped = traced(name, getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
""".replace("NAMES", repr(COLLECTIVES))


def command(kind: str, nproc: int, workdir: Path, repeat: int) -> list[str]:
    """Repetition `repeat`'s command: `train` alternates the strategies, `compare` runs both."""
    if kind == "compare":
        return [sys.executable, *COMPARE, "--nproc", str(nproc), "--output",
                str(workdir / "compare")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *TRAIN, "--strategy",
            STRATEGIES[repeat % len(STRATEGIES)]]


def outcome(returncode: int | None, output: str) -> str:
    """'ok', 'hang' (killed at the timeout), 'abort' (a rank died of SIGABRT) or 'failed'."""
    if returncode is None:
        return "hang"
    if returncode == 0:
        return "ok"
    if "SIGABRT" in output or "terminate called" in output:
        return "abort"
    return "failed"


def same_collectives(folder: Path, nproc: int) -> bool | None:
    """Whether every rank issued the same collectives (names and shapes) in the same order
    (None: no trace was written)."""
    traces = [folder / f"trace-rank{rank}.txt" for rank in range(nproc)]
    if not all(path.is_file() for path in traces):
        return None
    sequences = [[line.split(" @ ")[0] for line in path.read_text().splitlines()]
                 for path in traces]
    return all(sequence == sequences[0] for sequence in sequences)


def run_once(command: list[str], timeout: float, env: dict[str, str], cwd: Path
             ) -> tuple[str, float, str]:
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as child:
        try:
            output, _ = child.communicate(timeout=timeout)
            code: int | None = child.returncode
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            output, _ = child.communicate()
            code = None
    return outcome(code, output), time.perf_counter() - started, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command")
    parser.add_argument("--command", choices=("train", "compare"), default="train")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--trace", action="store_true", help="log each rank's collectives and "
                        "check that the ranks issued the same sequence")
    parser.add_argument("--output", type=Path, default=Path("runs/search_stress"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(DEBUG_ENV if args.debug else {})}
    counts: Counter[str] = Counter()
    compared: Counter[str] = Counter()  # --trace: runs whose ranks' collectives matched
    seconds: list[float] = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            launched = command(args.command, args.nproc, Path(folder), repeat)
            if args.trace:
                (Path(folder) / "sitecustomize.py").write_text(TRACER)
                env.update(FINETUNE_TRACE_DIR=folder, PYTHONPATH=os.pathsep.join(
                    [folder, os.environ.get("PYTHONPATH", "")]))
            result, elapsed, output = run_once(launched, args.timeout, env, Path(folder))
            if args.trace:
                same = same_collectives(Path(folder), args.nproc)
                compared[{True: "same", False: "different", None: "untraced"}[same]] += 1
                if same is False or args.debug:
                    for trace in Path(folder).glob("trace-rank*.txt"):
                        kept = args.output / f"run{repeat:03d}-{trace.name}"
                        kept.write_text(trace.read_text())
                if same is False:
                    result = "different-collectives"
            counts[result] += 1
            seconds.append(elapsed)
            if result != "ok" or args.debug:
                kept = args.output / f"run{repeat:03d}-{result}.log"
                kept.write_text(" ".join(launched) + "\n\n" + output)
            print(f"{repeat + 1}/{args.repeats} {launched[-1]}: {result} in {elapsed:.1f} s",
                  flush=True)
    summary: dict[str, Any] = {
        "cpu": cpu_label(), "command": args.command, "nproc": args.nproc,
        "repeats": args.repeats, "outcomes": dict(counts),
        "collectives": dict(compared) if args.trace else None,
        "seconds_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "seconds_max": max(seconds, default=None)}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if set(counts) <= {"ok"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
