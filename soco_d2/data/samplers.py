"""A deterministic, resumable, infinite sampler yielding ``(index, sample_seed)`` pairs."""
import itertools

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ResumableInfiniteSampler", "sample_seed"]


def sample_seed(seed: int, position: int) -> int:
    """The seed of the sample at global stream ``position`` (a 32-bit int)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class ResumableInfiniteSampler(Sampler):
    """An endless stream of ``(index, sample_seed)`` over a dataset of ``size`` items.

    The global stream is a concatenation of epochs; epoch ``e`` is a permutation of
    ``range(size)`` drawn from ``(seed, e)`` (the identity when ``shuffle=False``). Global
    position ``p`` holds item ``perm_{p // size}[p % size]``, with seed ``sample_seed(seed, p)``.
    No item is dropped: a batch may straddle two epochs.

    Process ``rank`` of ``world_size`` takes positions ``start_position + rank + k * world_size``
    for ``k = 0, 1, ...``. Starting at ``start_position = images already consumed`` therefore
    continues the stream of an interrupted run exactly.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start_position: int = 0):
        if size <= 0:
            raise ValueError(f"Cannot sample from an empty dataset (size={size}).")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}.")
        self.size, self.seed, self.rank, self.world_size = size, int(seed), rank, world_size
        self.shuffle, self.start_position = shuffle, int(start_position)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self):
        epoch, perm = -1, None
        for position in itertools.count(self.start_position + self.rank, self.world_size):
            e = position // self.size
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            yield int(perm[position % self.size]), sample_seed(self.seed, position)
