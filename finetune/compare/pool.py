"""`--jobs N`: several runs of a comparison at once, each in its own process.

One training run does not keep a small CPU busy: EfficientNet-Lite0's depthwise layers and
small late feature maps scale poorly across threads (on 2 cores, two single-thread runs side
by side make 1.25x the train steps of one two-thread run), so they finish a comparison
sooner than one two-thread run after another. Each run trains with cores // jobs threads
until the last run has started; from then on the runs still going take the cores of those that end
(cores // runs in progress, re-read at every batch: `CoreShare`), rather than leave them
idle. Not before: a run that starts while another still holds the extra cores would
oversubscribe them, and spinning OpenMP threads on too few cores cost more than they gain.
Each worker keeps its own `DecodedImages` store for the runs it does; rows come back to the
main process, which alone prints and writes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from finetune.callbacks import Callback, StopFit
from finetune.data import DecodedImages
from finetune.data.decoded import physical_memory

MAX_AUTO_JOBS = 4
RAM_PER_JOB = 6 * 1024**3

Outcome = dict[str, Any] | Exception  # a results row, or what the run raised
_BROKEN = object()  # a run whose pool broke: its worker, or another one, was killed


class WorkerDied(RuntimeError):
    """A run's worker process was killed from outside, also when it ran alone."""
_store: DecodedImages | None = None  # one per worker process, for all the runs it does
_counts: Any = None  # the pool's shared [runs not started, runs in progress, stop flag]
_jobs = 1


class CoreShare(Callback):
    """Keeps this process at cores // jobs threads while runs wait to start, then at
    cores // (runs in progress); checked at every batch and epoch, where a comparison that
    was stopped (Ctrl-C, an error in the main process) also ends this run."""

    def __init__(self, counts: Any, jobs: int, cores: int | None = None) -> None:
        self.counts, self.jobs, self.cores = counts, jobs, cores or os.cpu_count() or 1

    def apply(self) -> None:
        waiting, running, stop = self.counts[0], self.counts[1], self.counts[2]
        if stop:
            raise StopFit("the comparison was stopped")
        sharing = self.jobs if waiting else max(1, running)
        threads = max(1, self.cores // sharing)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.apply()

    def on_train_batch_end(self, trainer: Any, batch: Any, outputs: Any) -> None:
        self.apply()


def auto_jobs(runs: int, device: str, world_size: int, ram: int | None = None) -> int:
    """`--jobs auto`: on a CPU, one run per core, at most one per run, MAX_AUTO_JOBS in all
    (past that a run's own threads use the cores as well) and one per RAM_PER_JOB of memory
    (a ResNet50 run at batch 32, 224 px, fp32 peaks at 4.1 GB resident); one at a time on a
    GPU (the runs would share one card) and under torchrun."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu or world_size > 1:
        return 1
    ram = physical_memory() if ram is None else ram
    by_memory = MAX_AUTO_JOBS if ram is None else ram // RAM_PER_JOB
    return max(1, min(runs, os.cpu_count() or 1, MAX_AUTO_JOBS, by_memory))


def outcomes(todo: Sequence[tuple[int, str, int]], jobs: int, run: Callable[..., dict[str, Any]],
             shared: dict[str, Any]) -> Iterator[tuple[tuple[int, str, int], Outcome]]:
    """(item, row or exception) for each (index, spec, seed) `item` of `todo` as its run
    finishes: `run(spec, seed, **shared, decoded=<the worker's store>,
    extra_callbacks=[CoreShare])` in a pool of `jobs` processes (spawned, so that no thread
    state of this one is inherited).

    A worker killed from outside (the out-of-memory killer, a SIGKILL) breaks the whole pool
    and takes the runs in it down with it. Each of those is then run again on its own, in a
    pool of one: the others finish, and a run that dies alone too is reported as failed
    (`WorkerDied`)."""
    context = multiprocessing.get_context("spawn")
    counts = context.Array("i", [len(todo), 0, 0])
    finished = False
    try:
        broken = []
        for item, outcome in _pool_outcomes(todo, jobs, run, shared, context, counts):
            if outcome is _BROKEN:
                broken.append(item)
            else:
                yield item, outcome
        for item in sorted(broken):  # one at a time: a death now is the run's own
            for _, outcome in _pool_outcomes([item], 1, run, shared, context, counts):
                yield item, outcome if outcome is not _BROKEN else WorkerDied(
                    f"the worker running {item[1]} seed {item[2]} was killed from outside "
                    "(the out-of-memory killer or a signal), also when run alone; the other "
                    "runs went on")
        finished = True
    finally:  # Ctrl-C or an early exit: runs in progress stop at their next batch, and
        if not finished:  # runs not started (even those already queued) do not start
            counts[2] = 1


def _pool_outcomes(items: Sequence[tuple[int, str, int]], jobs: int,
                   run: Callable[..., dict[str, Any]], shared: dict[str, Any], context: Any,
                   counts: Any) -> Iterator[tuple[tuple[int, str, int], Any]]:
    """`items` run in a fresh pool of `jobs` workers: (item, row, exception or _BROKEN)."""
    counts[0], counts[1] = len(items), 0  # a dead pool's workers counted nothing out
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                               initargs=(counts, jobs))
    try:
        futures = {pool.submit(_in_worker, run, spec, seed, shared): (index, spec, seed)
                   for index, spec, seed in items}
        for future in as_completed(futures):
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                yield futures[future], _BROKEN
            elif error is not None and not isinstance(error, Exception):
                raise error  # Ctrl-C reached the worker first, or SystemExit: as in one process
            else:
                yield futures[future], future.result() if error is None else error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(counts: Any, jobs: int) -> None:
    global _counts, _jobs
    _counts, _jobs = counts, jobs


def _in_worker(run: Callable[..., dict[str, Any]], spec: str, seed: int,
               shared: dict[str, Any]) -> dict[str, Any]:
    global _store
    if _store is None:
        _store = DecodedImages()
    with _counts.get_lock():
        _counts[0] -= 1
        _counts[1] += 1
    try:
        if _counts[2]:
            raise KeyboardInterrupt("the comparison was stopped")
        share = CoreShare(_counts, _jobs)
        share.apply()
        return run(spec, seed, **shared, decoded=_store, extra_callbacks=[share])
    finally:
        with _counts.get_lock():
            _counts[1] -= 1
