"""Which examples go into which micro-batch: a pure function of (seed, step).

The example stream is a sequence of epochs, each a fresh permutation drawn from a
generator seeded with ``seed + epoch``. Optimizer step ``s`` consumes the global batch
at positions ``[s*G, (s+1)*G)`` of the stream, ``G = batch_size * grad_accum * world``;
micro-batch ``k`` of rank ``r`` is slice ``k*world + r`` of it. So a resumed run needs
only the step number to continue the same order, and 2 ranks with accumulation 1 see
exactly the micro-batches that 1 rank sees with accumulation 2.
"""

from __future__ import annotations

from functools import lru_cache

import torch


class DataOrder:
    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        if n_examples < 1:
            raise ValueError("the training set is empty: nothing to train on (check data.task / data.train_file)")
        self.n, self.b, self.accum, self.world, self.seed = n_examples, batch_size, grad_accum, world_size, seed

    @property
    def global_batch(self) -> int:
        return self.b * self.accum * self.world

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return self._epoch(epoch)[offset]

    def micro_batch(self, step: int, micro: int, rank: int) -> list[int]:
        """Example indices of micro-batch ``micro`` (0..grad_accum-1) of ``rank`` at ``step``."""
        start = step * self.global_batch + (micro * self.world + rank) * self.b
        return [self._at(p) for p in range(start, start + self.b)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
