"""Trainer callbacks and the small functions their configs point at."""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from gptlab.errors import NonFiniteLossError, TrainingInterrupted

log = logging.getLogger(__name__)


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Samples in a batch, for ThroughputMonitor's `batch_size_fn`."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input tokens in a batch, for ThroughputMonitor's `length_fn`: items/s are tokens/s."""
    return batch[0].numel()


class RandomStateCheckpoint(Callback):
    """Keeps the global RNG states in checkpoints, so dropout continues exactly on resume.

    Lightning restores weights, optimizer, schedule and loop progress, but not RNG states.
    Stored as tensors, ints and lists so that `torch.load(weights_only=True)` reads them.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state(
            (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
        )
        random.setstate(state_dict["python"])


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ModelCheckpoint keeps `last.ckpt` (the run's checkpoints folder without one)."""
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.dirpath:
            name = checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION
            return Path(checkpoint.dirpath) / name
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def saved_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


class NonFiniteLossGuard(Callback):
    """Stops training at the first nan/inf loss, before its gradients reach the weights.

    The check runs before backward, so the optimizer never steps on a non-finite loss; as a
    second line, no checkpoint with non-finite weights is ever written, so the last good
    `last.ckpt` survives.
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).item())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        last = last_checkpoint_path(trainer)
        step = saved_step(last)
        kept = (
            f"The last good checkpoint, {last} (step {step}), is kept"
            if step is not None
            else "No checkpoint had been saved yet"
        )
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else "?"
        raise NonFiniteLossError(
            f"Training stopped at step {trainer.global_step + 1}: the loss is {loss.item()} "
            f"(not finite), so that step was not applied. {kept}. The learning rate was {lr}: "
            f"start again with a lower optimizer.lr, optimizer.warmup_steps, or "
            f"trainer.gradient_clip_val=1.0."
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for name, parameter in pl_module.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"Not saving a checkpoint at step {trainer.global_step}: parameter {name} "
                    f"holds nan or inf, so the last good checkpoint is kept. Start again with a "
                    f"lower optimizer.lr or trainer.gradient_clip_val=1.0."
                )


class GracefulInterrupt(Callback):
    """Ctrl-C (SIGINT) ends the current step, saves `last.ckpt` and stops; a second one aborts.

    Stopping by exception, not `trainer.should_stop`, skips the validation Lightning would run
    first. The check is reduced over ranks, so all of them stop at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)
            if trainer.is_global_zero:
                log.info("Ctrl-C saves a checkpoint after the current step and stops training.")

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous_handler)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(
            f"Interrupted: saved step {trainer.global_step} to {path}. Continue with "
            f"`python scripts/train.py <same options> resume={path.parent.parent}`."
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


class LastCheckpointAtEnd(Callback):
    """Makes `last.ckpt` hold the final step when training ends.

    ModelCheckpoint writes it only every N steps and after a validation with a new best. So
    without this, a finished run could leave an older `last.ckpt`, and resuming it would
    repeat steps.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = last_checkpoint_path(trainer)
        stale = trainer.strategy.broadcast(saved_step(path) != trainer.global_step)
        if stale:
            trainer.save_checkpoint(path, weights_only=False)
