"""Frozen-prefix activation cache: run a frozen prefix once per image, train the suffix after.

A plain loop runs every frozen layer forward on every image in every epoch, which is why
freezing saves users less than they expect. When a strategy freezes a prefix of the network
(of its traced graph: `finetune.cache.cut`), its frozen BatchNorm layers are in eval mode,
its stochastic layers are off or absent and the images are not augmented, the prefix output
of an image never changes — so the Trainer computes it once (`ActivationCache.fill`) and
later epochs feed the stored activations to the suffix.
`finetune.cache.plan` decides which loaders are cached.
Shuffling is untouched: batches are drawn from the loader's own batch sampler.

Activations are stored in the dtype the prefix produced (bf16 under bf16 autocast, fp32
otherwise), in memory up to `memory_budget` bytes and in a memory-mapped file under
`directory` beyond it. A disk cache is named by a key over the prefix's weights, the cut, the
preprocessing and the sample list, so a stale cache is never read.

Under data-parallel training each process computes its share of the rows
(`finetune.runtime.distributed.RowShard`). The processes of one machine keep one copy: in
memory, a file in /dev/shm they all map (`machine_memory`); on disk, the one keyed file. Only
rows computed on other machines are sent, so a machine holds the cache once, not once per GPU.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from finetune.atomic import atomic_write_json, disk_full, out_of_space
from finetune.cache.cut import CutPoint, GraphSplit, UncacheableError
from finetune.data.images import file_key
from finetune.model.backbone import Backbone
from finetune.runtime.distributed import RowShard

SHARED_MEMORY = Path("/dev/shm")  # a tmpfs on Linux: files there are memory


@attrs.frozen
class Cut:
    """Where a backbone is split: its traced graph cut after node `index`; `label` is the
    last module of the prefix, e.g. "layer3.4.relu"."""

    index: int
    label: str
    graph: GraphSplit = attrs.field(eq=False, repr=False)

    @property
    def point(self) -> CutPoint:
        return CutPoint(self.index, self.label)


def split(backbone: Backbone, cut: Cut) -> tuple[Any, Any]:
    """(prefix, suffix) callables whose composition is the backbone's forward."""
    return cut.graph.prefix, cut.graph.suffix


class _Indices(torch.utils.data.Dataset):
    """Maps a sampler key — an int, or an (index, augmentation seed) pair — to its index."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Any) -> int:
        return int(key[0]) if isinstance(key, (tuple, list)) else int(key)


def dataset_key(dataset: Any) -> str:
    """A digest of what a dataset holds: its (path, label) samples with each file's content
    key (`file_key`), and its transform; or its tensors. Datasets of neither kind get their
    identity, so their disk cache is never shared across processes."""
    digest = hashlib.sha1()
    samples = getattr(dataset, "samples", None)
    tensors = getattr(dataset, "tensors", None)
    if samples is not None:
        for path, label in samples:
            digest.update(f"{path}\0{label}\0{file_key(path)}\n".encode())
        digest.update(repr(getattr(dataset, "transform", None)).encode())
    elif tensors is not None:
        for tensor in tensors:
            digest.update(tensor_bytes(tensor))
    else:
        digest.update(f"{type(dataset).__qualname__}:{id(dataset)}:{os.getpid()}".encode())
    return digest.hexdigest()


def is_deterministic(dataset: Any) -> bool:
    """Whether a dataset returns the same tensor for an index every time (no augmentation).
    Datasets say so with a `deterministic` attribute; a TensorDataset always is."""
    flag = getattr(dataset, "deterministic", None)
    if flag is not None:
        return bool(flag)
    return isinstance(dataset, torch.utils.data.TensorDataset)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values as bytes, whatever its dtype (bf16 has no numpy type) and memory
    format. `reshape(-1)` rather than `contiguous()`: a channels_last tensor with size-1 dims
    (a 1x1 conv weight) reports itself contiguous yet keeps a last stride > 1, which
    `view(torch.uint8)` refuses."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def cache_key(backbone: Backbone, cut: Cut, dataset: Any, dtype: str) -> str:
    digest = hashlib.sha1()
    for name, tensor in backbone.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    digest.update(f"{backbone.name}|{cut.label}@{cut.index}|{backbone.preprocessing}|{dtype}".encode())
    digest.update(dataset_key(dataset).encode())
    return digest.hexdigest()[:20]


class ActivationCache:
    """Prefix activations of one dataset, indexed like the dataset."""

    def __init__(
        self,
        backbone: Backbone,
        cut: Cut,
        *,
        memory_budget: int = 4 << 30,
        directory: str | Path | None = None,
    ) -> None:
        self.backbone, self.cut = backbone, cut
        self.prefix, self.suffix = split(backbone, cut)
        self.memory_budget, self.directory = memory_budget, directory
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.on_disk: Path | None = None
        self.complete = False
        self.shared = False  # one storage that this machine's processes all map

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else self.features.numel() * self.features.itemsize

    def fill(self, loader: Any, forward: Any, device: torch.device, shard: Any = None) -> None:
        """Run the prefix once over the loader's dataset (`fill_together` with this cache
        alone)."""
        fill_together([self], self.prefix, loader, forward, device, shard)

    def batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(activations, labels) batches in exactly the order the loader would give images:
        its own batch sampler, iterated the way DataLoader does (which first draws a base seed
        from the loader's generator), so a cached epoch shuffles as an uncached one."""
        if self.features is None or self.labels is None:
            raise RuntimeError("ActivationCache.fill must run before batches")
        if loader.batch_sampler is None:
            raise ValueError("the activation cache needs a DataLoader with a batch size")
        indices = torch.utils.data.DataLoader(
            _Indices(len(loader.dataset)), batch_sampler=loader.batch_sampler,
            generator=loader.generator,
        )
        for index in indices:
            yield self.features[index], self.labels[index]

    # -- storage ------------------------------------------------------------------------------
    def _allocate(self, count: int, sample: torch.Tensor, dataset: Any,
                  shard: RowShard | None = None) -> None:
        shape = (count, *sample.shape[1:])
        dtype = sample.dtype
        nbytes = torch.Size(shape).numel() * sample.itemsize
        self.labels = torch.empty(count, dtype=torch.long)
        if nbytes <= self.memory_budget or self.directory is None:
            if nbytes > self.memory_budget:
                raise MemoryError(
                    f"caching {self.cut.label} activations needs {nbytes / 2**30:.2f} GiB, over "
                    f"the {self.memory_budget / 2**30:.2f} GiB budget; raise "
                    "TrainConfig.cache_memory_gb, give activation_cache_dir to spill to disk, or "
                    "set feature_cache='off'."
                )
            mapped = machine_memory(shape, dtype, shard) if shard is not None else None
            self.shared = mapped is not None
            self.features = mapped if mapped is not None else torch.empty(shape, dtype=dtype)
            return
        key = cache_key(self.backbone, self.cut, dataset, str(dtype))
        folder = Path(self.directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.on_disk = folder / f"{key}.bin"
        meta = folder / f"{key}.json"
        self.complete = meta.exists() and self.on_disk.exists()
        if not self.complete:  # a memory-mapped file on a full disk would die of SIGBUS later
            reserve_disk(self.on_disk, nbytes)
        numel = torch.Size(shape).numel()
        storage = torch.from_file(str(self.on_disk), shared=True, size=numel, dtype=dtype)
        self.features = storage.view(shape)
        # the machine's processes map one file when their keys agree (not for datasets keyed
        # by identity, which differ per process)
        self.shared = shard is not None and shard.same_on_machine(str(self.on_disk.resolve()))
        if self.complete:
            self.labels = torch.tensor(json.loads(meta.read_text())["labels"], dtype=torch.long)

    def _mark_complete(self) -> None:
        self.complete = True
        if self.on_disk is not None and self.labels is not None:
            atomic_write_json(self.on_disk.with_suffix(".json"),
                              {"cut": self.cut.label, "labels": self.labels.tolist()})


def fill_together(caches: Sequence[ActivationCache], prefix: Any, loader: Any, forward: Any,
                  device: torch.device, shard: Any = None) -> None:
    """Fill `caches` (cuts of one backbone) from one pass of `prefix` over the loader's
    dataset, in dataset order, with the loader's batch size: `prefix` gives one activation per
    cache, a tuple of them when there are several (`finetune.cache.cut.multi_prefix`).
    `forward(prefix, images)` applies precision and memory format. Under data-parallel
    training `shard` (`finetune.runtime.distributed.RowShard`) names the rows this process
    computes, and then exchanges them so that every process can read all (one copy per
    machine where its processes share storage)."""
    dataset = loader.dataset
    rows = range(len(dataset)) if shard is None else shard.rows
    order = torch.utils.data.DataLoader(  # its own generator: the global RNG is untouched
        dataset if shard is None else torch.utils.data.Subset(dataset, rows),
        batch_size=loader.batch_size or 32, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        generator=torch.Generator(),
    )
    position = 0
    backbone = caches[0].backbone
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():  # copied into a normal tensor, which autograd reads
            for images, labels in _pairs(order):
                outs = forward(prefix, images.to(device))
                outs = outs if isinstance(outs, tuple) else (outs,)
                for cache, out in zip(caches, outs, strict=True):
                    if not isinstance(out, torch.Tensor) or out.dim() == 0 or len(out) != len(
                            images):
                        raise UncacheableError(
                            f"the prefix up to {cache.cut.label} does not give one activation "
                            "row per image")
                if caches[0].features is None:
                    for cache, out in zip(caches, outs, strict=True):
                        cache._allocate(len(dataset), out, dataset, shard)
                    done = all(cache.complete for cache in caches)
                    if done if shard is None else shard.agree(done):
                        return
                stop = position + len(images)
                if shard is None:
                    where, keep = slice(position, stop), slice(None)
                else:  # its own rows, not the repeats that pad the last shard
                    where, keep = shard.own(position, stop)
                    where = where[keep]
                for cache, out in zip(caches, outs, strict=True):
                    cache.features[where] = out.to("cpu")[keep]  # type: ignore[index]
                    cache.labels[where] = labels[keep]  # type: ignore[index]
                position = stop
    finally:
        backbone.train(was_training)
    if position != len(rows):
        raise RuntimeError(f"the loader gave {position} images for {len(rows)} samples")
    for cache in caches:
        if shard is not None:
            with torch.inference_mode():  # where the storage was made: it may write there
                shard.exchange(cache.features, cache.labels, loader.batch_size or 32,
                               shared=cache.shared)
        cache._mark_complete()


def machine_memory(shape: tuple[int, ...], dtype: torch.dtype, shard: RowShard
                   ) -> torch.Tensor | None:
    """One tensor in shared memory that every process of this machine maps, or None where
    no machine runs two processes of this run or a machine has no room in /dev/shm (then
    each process keeps its own copy). The machine's first process creates the file; once all
    have mapped it, it is unlinked, so the memory goes when the last process lets go of it,
    crash or not. Every process decides alike: the steps are collectives."""
    if not shard.machines_shared:
        return None
    path = SHARED_MEMORY / f"finetune-activations-{shard.token()}-{shard.machine[0]}.bin"
    numel = torch.Size(shape).numel()
    try:
        room = SHARED_MEMORY.is_dir()
        if room and shard.machine_leader:
            try:
                reserve_disk(path, numel * dtype.itemsize)
            except OSError as error:
                warnings.warn(f"each process keeps its own activation cache: {error}",
                              RuntimeWarning, stacklevel=2)
                room = False
        if not shard.agree(room):
            return None
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        shard.agree(True)  # every process has mapped it
        return mapped
    finally:
        if shard.machine_leader:
            path.unlink(missing_ok=True)


def reserve_disk(path: Path, nbytes: int) -> None:
    """Give `path` its `nbytes` on disk now (posix_fallocate where there is one), or fail
    with a clear error and no file: writing a sparse memory-mapped file on a full disk kills
    the process with SIGBUS instead of raising."""
    existing = path.stat().st_size if path.exists() else 0
    try:
        try:
            with open(path, "ab") as handle:
                os.posix_fallocate(handle.fileno(), 0, nbytes)
        except (AttributeError, OSError) as error:  # no fallocate here: check what is free
            if isinstance(error, OSError) and out_of_space(error):
                raise
            if shutil.disk_usage(path.parent).free < nbytes - existing:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
    except OSError as error:
        if not out_of_space(error):
            raise
        if not existing:
            path.unlink(missing_ok=True)
        raise disk_full(path, nbytes) from None


def _pairs(loader: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        images, labels = batch[0], batch[1]
        yield images, torch.as_tensor(labels)
