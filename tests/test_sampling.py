"""The training sampler: a true shuffle per epoch, disjoint rank shares, constant memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from gptlab.data.sampling import ResumableSampler, WindowPermutation


class Windows:
    """A dataset that is only a length: the sampler must never need more."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097, 100_003])
def test_permutation_visits_every_index_once(n: int) -> None:
    indices = WindowPermutation(n, seed=0, epoch=0)(np.arange(n))
    assert sorted(indices.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_epoch_only() -> None:
    positions = np.arange(1000)
    first = WindowPermutation(1000, seed=1, epoch=2)(positions)
    assert np.array_equal(first, WindowPermutation(1000, seed=1, epoch=2)(positions))
    assert not np.array_equal(first, WindowPermutation(1000, seed=1, epoch=3)(positions))
    assert not np.array_equal(first, WindowPermutation(1000, seed=2, epoch=2)(positions))
    # A shuffle, not a rotation or a few swaps: few indices stay near their position.
    assert np.mean(np.abs(first - positions) < 10) < 0.05


def test_permutation_of_a_chunk_equals_the_whole() -> None:
    order = WindowPermutation(10_000, seed=0, epoch=0)
    whole = order(np.arange(10_000))
    assert np.array_equal(order(np.arange(4321, 5000)), whole[4321:5000])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n", [100, 101, 102])
def test_ranks_split_the_epoch_as_distributed_sampler_does(n: int, shuffle: bool) -> None:
    ranks = [ResumableSampler(Windows(n), shuffle, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(5)
    shares = [list(sampler) for sampler in ranks]
    torch_shares = [
        list(DistributedSampler(Windows(n), num_replicas=3, rank=r, shuffle=False))
        for r in range(3)
    ]
    assert [len(share) for share in shares] == [len(share) for share in torch_shares]
    seen = [i for share in shares for i in share]
    # Padding repeats the first indices of the order, as DistributedSampler's does.
    assert set(seen) == set(range(n)) and len(seen) - n == (-n) % 3
    if not shuffle:
        assert shares == torch_shares


def test_start_drops_the_first_positions_once() -> None:
    sampler = ResumableSampler(Windows(50), shuffle=True)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.start = 12
    assert list(sampler) == full[12:]
    assert list(sampler) == full


def test_start_counts_every_rank_so_a_position_carries_to_another_world_size() -> None:
    def shares(replicas: int, start: int) -> list[list[int]]:
        samplers = [ResumableSampler(Windows(50), True, replicas, rank) for rank in range(replicas)]
        for sampler in samplers:
            sampler.set_epoch(2)
            sampler.start = start
        return [list(sampler) for sampler in samplers]

    (alone,) = shares(1, 0)
    # Two ranks that have had 12 windows together continue where one process would.
    first, second = shares(2, 12)
    assert first[:19] == alone[12:50:2] and second[:19] == alone[13:50:2]


def test_huge_dataset_costs_no_memory_per_window() -> None:
    # 10^12 windows: a list of them, or even a randperm tensor, could not be allocated.
    sampler = ResumableSampler(Windows(10**12), shuffle=True)
    tracemalloc.start()
    indices = iter(sampler)
    first = [next(indices) for _ in range(1000)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20
    assert len(set(first)) == 1000 and all(0 <= i < 10**12 for i in first)
