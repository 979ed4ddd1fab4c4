"""Trainer callbacks and the small functions their configs point at."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

# The dtype Lightning's own ThroughputMonitor uses to look up the device's peak.
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Samples in a batch, for ThroughputMonitor's `batch_size_fn`."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input tokens in a batch, for ThroughputMonitor's `length_fn`: items/s are tokens/s."""
    return batch[0].numel()


class ThroughputSummary(Callback):
    """Tokens/s and MFU over the whole run, printed and logged when training ends.

    ThroughputMonitor logs a moving window; this is the one number per run a user compares.
    Time runs from the end of one training batch to the end of the next, so data loading
    counts, validation does not, and the first `warmup_batches` (compilation, allocator
    warm-up) are left out. MFU divides by the peak of the device in use, as Lightning
    knows it; it is left out where Lightning knows none (CPUs).
    """

    def __init__(self, warmup_batches: int = 2) -> None:
        self.warmup_batches = warmup_batches
        self.seconds = 0.0
        self.batches = 0
        self.tokens = 0
        self._seen = 0
        self._last: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = self._now(trainer)
        self._seen += 1
        if self._last is not None and self._seen > self.warmup_batches:
            self.seconds += now - self._last
            self.batches += 1
            self.tokens += tokens_in_batch(batch)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.batches:
            return
        tokens_per_s = self.tokens / self.seconds * trainer.world_size
        metrics = {"throughput/run_tokens_per_sec": tokens_per_s}
        message = (
            f"Throughput: {tokens_per_s:,.0f} tokens/s, "
            f"{1000 * self.seconds / self.batches:.1f} ms/batch on {trainer.world_size} "
            f"x {trainer.strategy.root_device.type}"
        )
        flops_per_batch = getattr(pl_module, "flops_per_batch", None)
        if flops_per_batch:
            flops_per_s = flops_per_batch * self.batches / self.seconds
            message += f", {flops_per_s / 1e12:.3f} TFLOP/s per device"
            peak = get_available_flops(
                trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin)
            )
            if peak:
                metrics["throughput/run_mfu"] = flops_per_s / peak
                message += f", MFU {flops_per_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s peak"
            else:
                message += ", MFU n/a (Lightning knows no peak FLOP/s for this device)"
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(message)
