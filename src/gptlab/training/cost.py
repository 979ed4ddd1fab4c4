"""What a run on a CPU costs, said once its first steps are timed.

GPT-2 small trains for many hours on a CPU and takes most of a laptop's memory; the progress
bar's ETA said so only in passing, and nothing said what to run instead.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from gptlab.checks import check_count

log = logging.getLogger(__name__)

# A CPU run expected to take longer than this is offered the CPU-sized experiment.
LONG_CPU_RUN_S = 3600
CPU_SIZED_RUN = "python scripts/train.py experiment=shakespeare_char_cpu"


def peak_memory_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def duration(seconds: float) -> str:
    """`3 h 05 min`, `12 min`, `40 s`: a duration at the precision an estimate has."""
    if seconds < 90:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class CpuCost(Callback):
    """On a CPU, times `timed_steps` optimizer steps after the first (which pays for warm-up)
    and logs the time per step, the whole run's estimate and the peak memory so far, which
    the first steps' optimizer state has already reached."""

    def __init__(self, timed_steps: int = 3) -> None:
        self.timed_steps = check_count("callbacks.cpu_cost.timed_steps", timed_steps, 1)
        self.first_step: int | None = None
        self.clock: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        on_cpu = trainer.strategy.root_device.type == "cpu"
        self.first_step = trainer.global_step if on_cpu and trainer.max_steps > 0 else None

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if self.first_step is None:
            return
        done = trainer.global_step - self.first_step
        if done == 1 and self.clock is None:
            self.clock = time.perf_counter()
        elif done == 1 + self.timed_steps and self.clock is not None:
            per_step = (time.perf_counter() - self.clock) / self.timed_steps
            self.first_step = None
            if trainer.is_global_zero:
                log.info(self.report(per_step, trainer.max_steps - trainer.global_step))

    def report(self, per_step: float, steps_left: int) -> str:
        left = per_step * steps_left
        line = (
            f"On the CPU a step takes {per_step:.2f} s: the {steps_left:,} steps left take about "
            f"{duration(left)}, and this process has used up to "
            f"{peak_memory_bytes() / 2**30:.1f} GB of memory."
        )
        if left > LONG_CPU_RUN_S:
            line += (
                f" For a run sized for a CPU (minutes, under 1 GB): {CPU_SIZED_RUN}; this one "
                f"is meant for a GPU (trainer=gpu)."
            )
        return line
