"""Batch order shared by the tasks: a fixed permutation per (seed, epoch), cut into each
rank's batches. Deterministic and resumable without saved state; one process on the global
batch and N ranks on their slices see the same samples (:mod:`.distributed`)."""
from __future__ import annotations

from typing import Iterator

import torch

Tensor = torch.Tensor


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A fixed permutation per (seed, epoch): deterministic, resumable without saved state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rank_batches(order: Tensor, batch_size: int, rank: int, world_size: int) -> Iterator[Tensor]:
    """Rank ``rank``'s batches of ``order``: global step s takes the s-th block of
    batch_size x world_size indices, and this rank its slice. The last partial block is
    dropped, as MDEQ does."""
    block = batch_size * world_size
    for i in range(0, len(order) - block + 1, block):
        yield order[i + rank * batch_size:i + (rank + 1) * batch_size]
