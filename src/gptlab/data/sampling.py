"""Where a run is in its data, so a resumed run sees exactly the batches it had not reached.

Lightning restores weights, optimizer, schedule and loop counters from a checkpoint, and calls
`state_dict`/`load_state_dict` on a training DataLoader that has them; a plain DataLoader would
start the interrupted epoch again from its first batch, in a new order.

The shuffled order is computed per position, never held as a list: a list of every window
index grows with the corpus (a Python int per window, ~36 bytes), and on a 10 GB corpus with a
small stride it would not fit in memory at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit flips about half the output bits."""
    x = (x ^ (x >> np.uint64(30))) * MIX_1
    x = (x ^ (x >> np.uint64(27))) * MIX_2
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A pseudo-random permutation of range(n) that maps positions to indices in O(1) memory.

    A Feistel network is a bijection on [0, 4^h) whatever its round function; values that land
    at n or beyond are sent through it again ("cycle walking") until they fall below n, which
    keeps it a bijection on range(n). The domain is at most 4n, so that takes few passes.
    """

    ROUNDS = 6
    CHUNK = 1 << 16

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        rng = np.random.default_rng([seed, epoch])
        self.keys = rng.integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        indices = self._feistel(positions.astype(np.uint64))
        outside = np.flatnonzero(indices >= self.n)
        while len(outside):
            indices[outside] = self._feistel(indices[outside])
            outside = outside[indices[outside] >= self.n]
        return indices.astype(np.int64)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that also runs without a process group and can start mid-epoch.

    Being a DistributedSampler, Lightning keeps it under DDP instead of injecting its own, so
    ranks still get disjoint shares: rank r takes positions r, r + R, r + 2R, ... of one
    epoch's order, and, as DistributedSampler does, wraps around to the first positions to
    pad the last round. The order depends only on the seed and the epoch (Lightning
    calls `set_epoch`), never on the global RNG, so it is the same after a resume.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        """`num_replicas` and `rank` default to the process group's, or 1 and 0 without one."""
        if not (dist.is_available() and dist.is_initialized()):
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(
            dataset,
            num_replicas=num_replicas,  # None: DistributedSampler asks the process group
            rank=rank,
            shuffle=shuffle,
            # The seed Lightning's seed_everything exported, as for the samplers it injects.
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        """This rank's indices for the epoch from position `start` of the epoch's order, which
        counts the windows every rank together has had and applies once."""
        start = self.start + self.rank
        self.start = 0
        step = WindowPermutation.CHUNK * self.num_replicas
        indices = self.epoch_indices()
        for chunk_start in range(start, self.total_size, step):
            chunk_end = min(chunk_start + step, self.total_size)
            yield from indices(np.arange(chunk_start, chunk_end, self.num_replicas)).tolist()

    def epoch_indices(self) -> Callable[[np.ndarray], np.ndarray]:
        """Window index of each position of this epoch: shuffled or in order, padded by wrapping."""
        n = len(self.dataset)
        if not self.shuffle:
            return lambda positions: positions % n
        order = WindowPermutation(n, self.seed, self.epoch)
        return lambda positions: order(positions % n)


class RandomWindowSampler(ResumableSampler):
    """Windows drawn uniformly with replacement, as nanoGPT's `get_batch` draws offsets.

    Over the windows at every token (stride 1), that is a random offset per window. An epoch
    is `epoch_size` draws; each position's draw depends only on the seed, the epoch and the
    position, so a resumed run draws the same windows, and ranks draw disjoint positions.
    """

    def __init__(self, dataset: Dataset, epoch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=True, **kwargs)
        self.num_samples = math.ceil(epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def epoch_indices(self) -> Callable[[np.ndarray], np.ndarray]:
        n = np.uint64(len(self.dataset))
        key = np.random.default_rng([self.seed, self.epoch]).integers(0, 2**63, dtype=np.uint64)

        def draw(positions: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                return (mix64(positions.astype(np.uint64) ^ key) % n).astype(np.int64)

        return draw


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ResumableSampler that checkpoints how far into the epoch it is.

    The position is the windows every rank together has had, a count that does not depend on
    how they were split: a run saved by 2 processes of batch 4 continues on 1 process of batch
    8 (or 4) at the next window of the same order. Lightning fetches batches one at a time
    when the loader has a length, so batches given are batches trained on whenever a
    checkpoint is written at a batch end or after validation.
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Its own generator for the workers' base seed: a DataLoader otherwise draws it from the
        # global RNG at every new iterator, and a resumed run makes one at a different step.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._windows = 0
        self._resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "windows": self._windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Older checkpoints hold this rank's batches, saved with the same batch and world size.
        windows = state.get("windows", state.get("batches", 0) * self.windows_per_batch)
        self._resume_at = (state["epoch"], windows)
        self.sampler.set_epoch(state["epoch"])

    @property
    def windows_per_batch(self) -> int:
        """Windows one batch of every rank together holds."""
        return self.batch_size * self.sampler.num_replicas

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the sampler is read at the first batch, after Lightning's set_epoch.
        self._epoch = self.sampler.epoch
        resume_at, self._resume_at = self._resume_at, None
        self._windows = resume_at[1] if resume_at and resume_at[0] == self._epoch else 0
        self.sampler.start = self._windows
        for batch in super().__iter__():
            self._windows += self.windows_per_batch
            yield batch
