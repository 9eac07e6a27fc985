"""Data-parallel training on PyTorch's own engine: `torch.distributed`, `DistributedDataParallel`
and `DistributedSampler`, for a Trainer started by `torchrun` (or in a script that initialised a
process group itself).

Every process runs the same Trainer on its own share of each batch; DDP averages the gradients
in backward, so all processes take the same optimizer step. This module holds what the Trainer
needs for that, and nothing when only one process runs (every function then does nothing):

- `start`: join the group torchrun describes in the environment (gloo on the CPU, nccl on CUDA);
  a group a script already initialised is kept as it is. `joined` holds it for a command's
  length; `say` prints on rank 0 alone.
- `shard_loader`: give each process its share of a DataLoader (a `DistributedSampler`, or for
  finetune.data's `SeededShuffle` the same order strided by one — `ShardedSeededShuffle`).
- `DataParallel`: the DDP wrapper over what trains now, rebuilt when the strategy changes it.
- `rank_seed`: each process's seed for its RNGs, derived from the run's seed and the rank.
- `sums`, `any_rank`, `same_as_main`, `gather_outputs`, `RowShard`: the reductions: epoch
  metrics, the stop flag, probe verdicts, evaluation outputs (each sample exactly once, in the
  sampler's order) and the activation cache's rows.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from finetune.data.datasets import SeededShuffle
from finetune.data.sharding import ShardedSeededShuffle
from finetune.errors import CheckpointError, DataError, DeviceError

Forward = Callable[[torch.Tensor], torch.Tensor]
_owned = False  # whether `start` initialised the process group (and `stop` may destroy it)


# -- the process group ----------------------------------------------------------------------
def active() -> bool:
    """Whether this process trains data-parallel: a process group of two or more is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def nodes() -> int:
    """How many machines the run spans: torchrun's launchers (its `--nnodes`), from the
    processes per launcher it sets in LOCAL_WORLD_SIZE; 1 outside a process group."""
    if not active():
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return max(1, world_size() // max(1, local))


def is_main() -> bool:
    """Rank 0, the one process that writes files, logs and shows progress (True alone)."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """This process's seed for its global RNGs (dropout, MixUp, augmentation drawn from
    torch): `seed` itself in one process, else one derived from (seed, rank), so ranks draw
    differently from each other and alike from run to run. The data order is not drawn
    from it: samplers take `seed` itself, so the ranks' shares stay one permutation."""
    if world_size() == 1:
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])


def start(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1, RANK, MASTER_ADDR/PORT):
    nccl when training on CUDA, else gloo. Returns whether it created one; an existing group
    (a script called `init_process_group` itself) is kept, and without torchrun nothing
    happens."""
    global _owned
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    # a script that never calls stop() still ends the group before the interpreter shuts
    # down: a gloo thread still running then can abort the process (docs/distributed.md)
    atexit.unregister(stop)
    atexit.register(stop)
    _owned = True
    return True


def stop() -> None:
    """Destroy the process group if `start` created it (a script's own group stays up)."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[None]:
    """A command's length inside the group torchrun describes: `start`, and `stop` after if
    `start` created it (a script's own group, or none, is left as it is)."""
    started = start(device)
    try:
        yield
    finally:
        if started:
            stop()


def say(*args: Any, **kwargs: Any) -> None:
    """`print`, on rank 0 alone: the other processes of a command stay silent."""
    if is_main():
        print(*args, **kwargs)


def local_device(spec: str) -> torch.device:
    """The device `TrainConfig.device` names: "auto" is CUDA when present, else the CPU; a
    CUDA card that is not there is a one-line error; and `cuda` means this process's own card
    (LOCAL_RANK) under data-parallel training."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec.partition(":")[2] or 0)
        if index >= available:
            raise DeviceError(
                f"device '{spec}' requested but this machine has "
                f"{available or 'no usable'} CUDA device{'s' if available != 1 else ''}; use "
                "--device auto (CUDA when present, else the CPU) or --device cpu."
            )
    device = torch.device(spec)
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_world_size(checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse a resume on another number of processes: the batch each optimizer step sees
    (processes × batch size) and each process's share of the data would change."""
    saved, now = int(checkpoint.get("world_size", 1)), world_size()
    if saved != now:
        raise CheckpointError(
            f"checkpoint {path} was trained by {saved} process{'es' if saved > 1 else ''} and "
            f"this run has {now}; resume with the same number (torchrun --nnodes × "
            f"--nproc_per_node = {saved}), or start a new run in another folder."
        )


# -- data -------------------------------------------------------------------------------------
def shard_loader(loader: Iterable[Any], seed: int | None = None) -> Iterable[Any]:
    """`loader` with this process's share of its samples (itself when one process runs, or
    when its sampler is already distributed). Shuffled loaders keep shuffling per epoch
    (`set_epoch`); evaluation loaders are padded by at most one sample per process, which
    `gather_outputs` removes again. The same loader gets the same share back every time (an
    activation cache knows a loader by identity: a search's candidates, and the advisor's
    depths, then share one fill)."""
    if not active():
        return loader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, (DistributedSampler, ShardedSeededShuffle)):
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or not isinstance(
            sampler, (SeededShuffle, RandomSampler, SequentialSampler)):
        raise DataError(
            "under data-parallel training each process needs its share of the data: pass a torch "
            "DataLoader with a batch_size and shuffle=True/False (or finetune.data's loaders), "
            "which finetune shards itself, or give it a DistributedSampler yourself; got "
            f"{type(loader).__name__} with sampler {type(sampler).__name__}."
        )
    # the seed only orders a RandomSampler's shards (SeededShuffle carries its own)
    key = (rank(), world_size(), seed if isinstance(sampler, RandomSampler) else None)
    shares = _shares.setdefault(loader, {})
    if key not in shares:
        shares[key] = _share(loader, sampler, seed)
    return shares[key]


# each loader's shares, by (rank, world size, seed), for as long as the loader lives
_shares: weakref.WeakKeyDictionary[DataLoader, dict[tuple[int, int, int | None], DataLoader]] = (
    weakref.WeakKeyDictionary())


def _share(loader: DataLoader, sampler: Any, seed: int | None) -> DataLoader:
    """A DataLoader like `loader` over this process's share of its samples."""
    drop_last = loader.drop_last
    if isinstance(sampler, SeededShuffle):
        shard: Any = ShardedSeededShuffle(sampler.size, sampler.seed, rank(), world_size(),
                                          sampler.weights)
        shard.epoch = sampler.epoch
        drop_last = len(shard) % loader.batch_size == 1  # BatchNorm cannot train on 1 image
    else:
        shard = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(),
                                   shuffle=isinstance(sampler, RandomSampler), seed=seed or 0)
    workers = loader.num_workers
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=shard, num_workers=workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers and workers > 0,
    )


# -- the model --------------------------------------------------------------------------------
class _Through(nn.Module):
    """Registers the backbone (so DDP finds its trainable parameters) but runs `forward`: the
    suffix of a cut when the training pass runs on cached activations."""

    def __init__(self, backbone: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.backbone = backbone
        self.__dict__["run"] = forward  # a plain attribute: registers nothing twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class DataParallel:
    """The DistributedDataParallel wrapper over what trains now.

    DDP registers only parameters with `requires_grad=True`, so frozen ones never enter its
    buckets; it is built for one set of trainable parameters, hence `reset` whenever the
    strategy changes what trains (with the optimizer) and a new wrapper when the training
    pass runs another forward (the backbone, or the suffix of a cached prefix). A wrapper
    lives for one fit (the Trainer resets it when the fit ends): it holds the process group,
    so a wrapper kept longer would keep the group and its threads alive past `stop`.
    """

    def __init__(self) -> None:
        self._source: Forward | None = None
        self._wrapper: nn.Module | None = None

    def reset(self) -> None:
        self._source = self._wrapper = None

    def wrap(self, backbone: nn.Module, forward: Forward, device: torch.device) -> Forward:
        """`forward` as the training pass must call it: itself with one process."""
        if not active() or not any(p.requires_grad for p in backbone.parameters()):
            return forward
        if self._source is not forward or self._wrapper is None:
            module = backbone if forward is backbone else _Through(backbone, forward)
            self._wrapper = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
            self._source = forward
        return self._wrapper


# -- reductions -------------------------------------------------------------------------------
def _device() -> torch.device:
    """Where collectives take their tensors: this card for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sums(*values: float) -> list[float]:
    """Each value summed over the processes (itself with one)."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return total.tolist()


def any_rank(flag: bool) -> bool:
    """True on every process when it is True on any (a stop that rank 0 decided)."""
    return sums(float(flag))[0] > 0


def same_as_main(value: Any) -> Any:
    """Rank 0's value on every process (timed probes may decide differently per process)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=_device())
    return holder[0]


def _all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every process's `tensor` (same shape everywhere) — of `group`, else of all — as bytes
    so any dtype travels."""
    local = tensor.contiguous()
    raw = local.reshape(-1).view(torch.uint8).to(_device())
    parts = [torch.empty_like(raw) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, raw, group=group)
    return [part.cpu().view(local.dtype).view(local.shape) for part in parts]


Outputs = tuple[torch.Tensor, torch.Tensor | None]


def gather_outputs(outputs: Iterable[Outputs], loader: Any) -> Iterator[Outputs]:
    """Every process's (logits, labels) of a `shard_loader` pass as one batch, in the order
    the sampler dealt them, without DistributedSampler's padding: each sample exactly once."""
    if not active():
        yield from outputs
        return
    logits, labels = [], []
    for batch_logits, batch_labels in outputs:
        logits.append(batch_logits.float())
        labels.append(batch_labels)
    if not logits:
        return
    device, local = logits[0].device, torch.cat(logits).cpu()
    keep = min(len(loader.dataset), world_size() * len(local))

    def interleave(tensor: torch.Tensor) -> torch.Tensor:  # rank r holds entries r, r+W, …
        stacked = torch.stack(_all_gather(tensor))
        return stacked.transpose(0, 1).reshape(-1, *tensor.shape[1:])[:keep].to(device)

    targets = None if labels[0] is None else interleave(torch.cat(labels).cpu())
    yield interleave(local), targets


class RowShard:
    """The activation cache's rows this process computes (DistributedSampler's share of the
    dataset in order), and the exchange after which every process can read every row: each
    epoch deals the rows to the processes anew, so each needs them all.

    The processes of one machine (one torchrun launcher) may hold the rows in one storage
    they all map (`finetune.cache.store`): each writes its own rows there, and only the
    machines' first processes exchange rows, each sending its machine's. Rows that
    DistributedSampler repeats to pad the last shard are computed but written by their owner
    alone, so every row is one process's computation, whichever storage holds it."""

    def __init__(self, size: int) -> None:
        count = world_size()
        self.rows_of = [list(DistributedSampler(range(size), num_replicas=count, rank=q,
                                                shuffle=False)) for q in range(count)]
        # position k of rank q is entry q + k*count of the padded order: past `size`, a repeat
        self.genuine_of = [[q + k * count < size for k in range(len(rows))]
                           for q, rows in enumerate(self.rows_of)]
        self.rows = self.rows_of[rank()]
        self.machines = machines()
        self.machine = next(m for m in self.machines if rank() in m)
        self.machine_leader = rank() == self.machine[0]

    @classmethod
    def for_dataset(cls, size: int) -> RowShard | None:
        return cls(size) if active() else None

    @property
    def machines_shared(self) -> bool:
        """Whether some machine runs two or more processes of this run (then each machine's
        processes may share storage); the same answer on every process."""
        return any(len(machine) > 1 for machine in self.machines)

    def agree(self, flag: bool) -> bool:
        """True only where every process says True (a disk cache complete everywhere); a
        barrier too."""
        return sums(float(not flag))[0] == 0

    def token(self) -> str:
        """One random name for the whole run (rank 0's), for storage the processes share."""
        return same_as_main(uuid.uuid4().hex)

    def same_on_machine(self, value: Any) -> bool:
        """Whether on every machine its processes hold equal `value`s (a file path): the
        same answer on every process."""
        values: list[Any] = [None] * world_size()
        dist.all_gather_object(values, value)
        return all(values[q] == values[machine[0]] for machine in self.machines
                   for q in machine)

    def own(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, which of them to write) for this process's positions start..stop."""
        return self._rows([rank()], start, stop - start)

    def exchange(self, features: torch.Tensor, labels: torch.Tensor, chunk: int,
                 shared: bool = False) -> None:
        """Write the other processes' rows of `features` and `labels` (this process's own
        are written). `shared`: `features` is one storage of this machine's processes, so
        their rows are there once all have written, and only other machines' rows travel."""
        if not shared:
            self._gather(features, chunk)
            self._gather(labels, chunk)
            return
        self.agree(True)  # every process has written its own rows
        if len(self.machines) > 1:
            self._between_machines(features, chunk)
        self._gather(labels, chunk)
        self.agree(True)  # nobody reads before every row is written

    def _gather(self, tensor: torch.Tensor, chunk: int) -> None:
        """Every process's rows of `tensor` into this process's copy."""
        for start in range(0, len(self.rows), chunk):
            parts = _all_gather(tensor[torch.as_tensor(self.rows[start:start + chunk])])
            for q, part in enumerate(parts):
                if q != rank():
                    rows, keep = self._rows([q], start, chunk)
                    tensor[rows[keep]] = part[keep]

    def _between_machines(self, features: torch.Tensor, chunk: int) -> None:
        """Other machines' rows into this machine's storage: the machines' first processes
        gather among themselves (a group of their own), each sending its machine's rows —
        so a machine takes in each row once, not once per process."""
        group = dist.new_group([machine[0] for machine in self.machines])  # all take part
        try:
            if not self.machine_leader:
                return
            widest = max(len(machine) for machine in self.machines)
            for start in range(0, len(self.rows), chunk):
                rows, _ = self._rows(self.machine, start, chunk)
                mine = features[rows]
                if len(self.machine) < widest:  # all_gather wants one shape: pad, cut after
                    pad = len(rows) // len(self.machine) * widest - len(rows)
                    mine = torch.cat([mine, mine.new_zeros(pad, *mine.shape[1:])])
                parts = _all_gather(mine, group)
                for machine, part in zip(self.machines, parts, strict=True):
                    if machine is not self.machine:
                        rows, keep = self._rows(machine, start, chunk)
                        features[rows[keep]] = part[:len(rows)][keep]
        finally:
            if self.machine_leader:  # the others are not in it
                dist.destroy_process_group(group)

    def _rows(self, ranks: list[int], start: int, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `ranks` computed at positions start..start+chunk, and which are theirs
        to write (not a pad's repeat)."""
        rows = [row for q in ranks for row in self.rows_of[q][start:start + chunk]]
        keep = [flag for q in ranks for flag in self.genuine_of[q][start:start + chunk]]
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(keep, dtype=torch.bool)


def machines() -> list[list[int]]:
    """The ranks of each machine, in order: torchrun's launcher (GROUP_RANK) on its host; a
    process group started without torchrun groups by host name alone."""
    if not active():
        return [[0]]
    here = f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '')}"
    everywhere: list[Any] = [None] * world_size()
    dist.all_gather_object(everywhere, here)
    return [[q for q, there in enumerate(everywhere) if there == key]
            for key in dict.fromkeys(everywhere)]
