"""Trainer callbacks and the small functions their configs point at."""

from __future__ import annotations

import torch


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Samples in a batch, for ThroughputMonitor's `batch_size_fn`."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input tokens in a batch, for ThroughputMonitor's `length_fn`: items/s are tokens/s."""
    return batch[0].numel()
