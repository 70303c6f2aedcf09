"""Samplers that make data order a pure function of (seed, epoch), shard it over DDP ranks, and can start
mid-epoch - so ``--resume`` replays exactly the batches an uninterrupted run would have seen.

The train sampler yields ``(index, augmentation_seed)`` pairs; the dataset seeds its augmentation with the
second item, so augmentation does not depend on worker processes or the global RNG either.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """Shuffled (or weighted, with replacement) epoch order, padded and strided over ranks like
    ``DistributedSampler``; ``skip`` drops the first ``skip`` samples of this rank (resume mid-epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, weights=None):
        self.n, self.seed, self.rank, self.world = n, int(seed), rank, world
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch, self.skip = 0, 0
        self.per_rank = -(-n // world)

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = int(epoch), int(skip)

    def order(self) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None and not torch.all(self.weights == self.weights[0]):
            idx = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        else:
            idx = torch.randperm(self.n, generator=g).tolist()
            idx += idx[: total - len(idx)]  # pad so every rank gets the same number of batches
        seeds = torch.randint(0, 2 ** 31 - 1, (total,), generator=g).tolist()
        return idx[self.rank::self.world], seeds[self.rank::self.world]

    def __iter__(self):
        idx, seeds = self.order()
        return iter(list(zip(idx, seeds))[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class ShardSampler(Sampler):
    """Evaluation: rank r gets indices r, r+W, ... with no padding, so gathered metrics count each item once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
