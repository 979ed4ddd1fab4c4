"""Where a Trainer is in its run, counted in optimizer steps (not micro-batches)."""

from __future__ import annotations

import lightning as L


def micro_batches(steps: int, accumulation: int) -> int:
    """Lightning counts `val_check_interval` in micro-batches; gptlab's settings count steps."""
    return steps * accumulation


def val_interval_in_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps between validations (None: a fraction of an epoch)."""
    interval = trainer.val_check_interval
    return interval // trainer.accumulate_grad_batches if isinstance(interval, int) else None


def validates_after_step(trainer: L.Trainer) -> bool:
    """Whether Lightning validates after the optimizer step just taken: every
    `val_check_interval` micro-batches, counted over the run as gptlab sets it
    (`check_val_every_n_epoch=None`). False where that cannot be told (a fraction of an epoch).
    """
    interval = val_interval_in_steps(trainer)
    return (
        bool(interval)
        and trainer.check_val_every_n_epoch is None
        and trainer.enable_validation
        and trainer.global_step % interval == 0
    )


def optimizer_stepped(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended completed an optimizer step (the last one accumulated)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or (
        batch_idx + 1 == trainer.num_training_batches
    )


def is_final_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer step just taken is the run's last (by max_steps or max_epochs)."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= (
        trainer.max_epochs
    )
    return last_epoch and trainer.is_last_batch
