"""What the per-batch agreement on a non-finite loss costs: one `distributed.any_rank` (an
all-reduce of one number) per training batch under data parallelism.

Two gloo processes on this machine time `--calls` calls of `any_rank`, after a warm-up, and
rank 0 prints the median of `--repeats` rounds in microseconds per call — to set against a
step's time (tens of milliseconds for the smallest cached head on this CPU).

    python -m benchmarks.collective_cost --calls 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from benchmarks.measured import cpu_label
from finetune.runtime import distributed


def _rank(rank: int, port: int, calls: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.joined("cpu"):
        for _ in range(200):
            distributed.any_rank(False)
        rounds = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                distributed.any_rank(False)
            rounds.append((time.perf_counter() - started) / calls)
        if rank == 0:
            print(f"any_rank on 2 gloo processes: {1e6 * statistics.median(rounds):.0f} us "
                  f"per call (median of {repeats} rounds of {calls}; {cpu_label()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank, args=(port, args.calls, args.repeats), nprocs=2,
                       start_method="spawn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
