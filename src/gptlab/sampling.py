"""Where a run is in its data, so a resumed run sees exactly the batches it had not reached.

Lightning restores weights, optimizer, schedule and loop counters from a checkpoint, and calls
`state_dict`/`load_state_dict` on a training DataLoader that has them; a plain DataLoader would
start the interrupted epoch again from its first batch, in a new order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that also runs without a process group and can start mid-epoch.

    Being a DistributedSampler, Lightning keeps it under DDP instead of injecting its own, so
    ranks still get disjoint shares. The order depends only on the seed and the epoch (Lightning
    calls `set_epoch`), never on the global RNG, so it is the same after a resume.
    """

    def __init__(self, dataset: Dataset, shuffle: bool) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            # The seed Lightning's seed_everything exported, as for the samplers it injects.
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        """This rank's indices for the epoch, less the first `skip`, which applies once."""
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ResumableSampler that checkpoints how many batches of the epoch it gave.

    Lightning fetches batches one at a time when the loader has a length, so batches given are
    batches trained on whenever a checkpoint is written at a batch end or after validation.
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Its own generator for the workers' base seed: a DataLoader otherwise draws it from the
        # global RNG at every new iterator, and a resumed run makes one at a different step.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (state["epoch"], state["batches"])
        self.sampler.set_epoch(state["epoch"])

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the sampler is read at the first batch, after Lightning's set_epoch.
        self._epoch = self.sampler.epoch
        resume_at, self._resume_at = self._resume_at, None
        self._batches = resume_at[1] if resume_at and resume_at[0] == self._epoch else 0
        self.sampler.skip = self._batches * self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch
