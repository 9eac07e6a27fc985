"""`ShardedSeededShuffle`: one process's share of `SeededShuffle`'s epoch order.

Under data-parallel training each process trains on its own share of every epoch. The order
stays `SeededShuffle`'s (seeded by (seed, epoch), each index with its augmentation seed; a
weighted draw under balanced sampling) and torch's `DistributedSampler` takes every
`world_size`-th entry of it from `rank`, padding the epoch to a multiple of the world size.
So with a per-process batch B, optimizer step k of W processes sees exactly the images step k
of one process with batch W·B sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import DistributedSampler

from finetune.data.datasets import SeededShuffle


class ShardedSeededShuffle(SeededShuffle):
    """`SeededShuffle` order, strided over `world_size` processes by `DistributedSampler`."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int,
                 weights: Sequence[float] | None = None) -> None:
        super().__init__(size, seed, weights)
        self.rank, self.world_size = rank, world_size

    def _shard(self, keys: list) -> DistributedSampler:
        return DistributedSampler(keys, num_replicas=self.world_size, rank=self.rank,
                                  shuffle=False, drop_last=False)

    def __len__(self) -> int:
        return len(self._shard(list(range(self.size))))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = list(super().__iter__())
        return iter([keys[i] for i in self._shard(keys)])
