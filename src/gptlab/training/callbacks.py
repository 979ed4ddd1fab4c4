"""Trainer callbacks that keep a run safe: exact resume, nan stops, signals, a final validation."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from gptlab.errors import (
    NonFiniteLossError,
    StoppedBeforeTraining,
    TrainingAborted,
    TrainingInterrupted,
)
from gptlab.runs import slurm_job_id
from gptlab.training.checkpoints import RunCheckpoint, last_checkpoint, saved_step
from gptlab.training.optim import SCALED_PRECISION
from gptlab.training.steps import is_final_step, optimizer_stepped

log = logging.getLogger(__name__)

# Signals that stop a run cleanly. SIGUSR1 is what SLURM's `--signal=USR1@90` sends ahead of
# the time limit.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
# No non-finite loss seen yet: larger than any step.
NO_STEP = torch.iinfo(torch.int64).max


def checkpoint_callback(trainer: L.Trainer) -> RunCheckpoint | None:
    checkpoint = trainer.checkpoint_callback
    return checkpoint if isinstance(checkpoint, RunCheckpoint) else None


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run keeps `last.ckpt` (the run directory's checkpoints folder without one)."""
    checkpoint = checkpoint_callback(trainer)
    return checkpoint.last_path if checkpoint else last_checkpoint(trainer.default_root_dir)


def save_last(trainer: L.Trainer) -> Path:
    """Write `last.ckpt` for the step just taken."""
    checkpoint = checkpoint_callback(trainer)
    if checkpoint is not None:
        return checkpoint.save_last_now(trainer)
    path = last_checkpoint_path(trainer)
    trainer.save_checkpoint(path, weights_only=False)
    return path


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


class NonFiniteLossGuard(Callback):
    """Stops training at a nan/inf loss; a checkpoint with non-finite weights is never written.

    `check=every_step` reads each loss before its backward, so the bad step never reaches the
    weights; on a CPU that costs nothing, since there is no queue of work to stall.
    `check=log_steps` keeps the verdict on the device and reads it on the steps the loggers
    write and before every checkpoint, so a GPU never waits; a fused AdamW then skips a step
    whose loss was not finite on the device itself, through the same `found_inf` input a
    GradScaler uses. `auto`: every_step on CPUs, log_steps on accelerators.
    """

    def __init__(self, check: Literal["auto", "every_step", "log_steps"] = "auto") -> None:
        self.check = check
        self.every_step = check == "every_step"
        self._step_bad: torch.Tensor | None = None
        self._bad_steps: torch.Tensor | None = None
        self._first_bad: torch.Tensor | None = None
        self._skips_on_device = False
        self._checked_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        self.every_step = self.check == "every_step" or (
            self.check == "auto" and device.type == "cpu"
        )
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self._checked_step = trainer.global_step
        # A GradScaler drives fused AdamW's skip input itself under 16-mixed.
        self._skips_on_device = trainer.precision != SCALED_PRECISION and any(
            optimizer.defaults.get("fused") for optimizer in trainer.optimizers
        )

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.every_step:
            if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                self._stop(trainer, trainer.global_step + 1, 1, applied=False)
            return
        self._step_bad = bad if self._step_bad is None else self._step_bad | bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.every_step or self._step_bad is None:
            return
        # One verdict for every rank, reduced on the device: a step bad on any rank is skipped
        # on all of them, so the replicas never part.
        self._step_bad = trainer.strategy.reduce(self._step_bad.int(), reduce_op="sum") > 0
        if self._skips_on_device:
            optimizer.found_inf = self._step_bad.float()
        self._bad_steps += self._step_bad
        first = (self._first_bad == NO_STEP) & self._step_bad
        self._first_bad = torch.where(first, trainer.global_step + 1, self._first_bad)
        self._step_bad = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.every_step or not optimizer_stepped(trainer, batch_idx):
            return
        if trainer.global_step % trainer.log_every_n_steps == 0 or is_final_step(trainer):
            self._check_flag(trainer)

    def _check_flag(self, trainer: L.Trainer) -> None:
        """Read the device's verdict on the steps since the last check (a host sync)."""
        bad_steps = int(self._bad_steps)
        if bad_steps:
            self._stop(trainer, int(self._first_bad), bad_steps, applied=not self._skips_on_device)
        self._checked_step = trainer.global_step

    def _stop(self, trainer: L.Trainer, step: int, bad_steps: int, applied: bool) -> None:
        last = last_checkpoint_path(trainer)
        kept_step = saved_step(last)
        kept = (
            f"The last good checkpoint, {last} (step {kept_step}), is kept"
            if kept_step is not None
            else "No checkpoint had been saved yet"
        )
        if self.every_step:
            what = "so that step was not applied"
        else:
            fate = (
                "they reached the weights (only a fused AdamW skips them)"
                if applied
                else "fused AdamW skipped them, so the weights never took them"
            )
            what = (
                f"found at step {trainer.global_step} with {bad_steps} such step(s) since step "
                f"{self._checked_step}; {fate}"
            )
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else "?"
        raise NonFiniteLossError(
            f"Training stopped at step {step}: the loss is nan or inf (not finite), {what}. "
            f"{kept}. The learning rate was {lr}: start again with a lower optimizer.lr, more "
            f"optimizer.warmup_steps, or a lower trainer.gradient_clip_val."
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.every_step and self._bad_steps is not None:
            self._check_flag(trainer)
        finite = torch.stack([p.isfinite().all() for p in pl_module.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(
                f"Not saving a checkpoint at step {trainer.global_step}: the weights hold nan or "
                f"inf, so the last good checkpoint is kept. Start again with a lower "
                f"optimizer.lr or trainer.gradient_clip_val."
            )


class GracefulInterrupt(Callback):
    """Ctrl-C, SIGTERM or SIGUSR1 finishes the optimizer step, saves `last.ckpt` and stops.

    SIGTERM is how clusters and spot instances stop a job; SIGUSR1 is SLURM's warning before
    the time limit (`--signal=USR1@90`), after which the job is requeued with `scontrol
    requeue` and continues in the same run directory. A second signal stops at once, without
    saving. Stopping by exception, not `trainer.should_stop`, skips the validation Lightning
    would run first. The decision is reduced over ranks, so all of them stop at the same step.
    The save happens in `on_exception`, after the other callbacks (the training monitor first)
    have recorded the step, so the checkpoint holds it.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._training = False
        self._installed = False
        # The handlers these replaced, by signal, given back when fit ends.
        self._previous_handlers: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """From the start of fit. Before the first step (the untrained model's validation, a
        checkpoint being restored) a signal stops at once: there is nothing new to save."""
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        self._installed = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True

    def _request_stop(self, signum: int, frame: Any) -> None:
        if not self._installed:
            self._pass_on(signum, frame)
            return
        if not self._training:
            raise StoppedBeforeTraining(signum)
        if self.requested is not None:
            raise TrainingAborted(signum)
        self.requested = signum

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Mid-accumulation the gradients so far would be lost while the data position counts
        # their batches as done, so stop only where an optimizer step has just been taken.
        if not optimizer_stepped(trainer, batch_idx):
            return
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            raise TrainingInterrupted(self.requested or signal.SIGTERM, trainer.global_step)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        if not isinstance(exception, TrainingInterrupted) or isinstance(exception, TrainingAborted):
            return
        exception.checkpoint = save_last(trainer)
        if exception.signum == getattr(signal, "SIGUSR1", None) and trainer.is_global_zero:
            exception.requeued = requeue_slurm_job()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if not self._installed:
            return
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._installed = False

    def _pass_on(self, signum: int, frame: Any) -> None:
        """A signal after fit: Lightning's signal connector, which found this handler installed
        when fit began, puts it back once fit ends by an exception. The handler it replaced
        (Python's KeyboardInterrupt for Ctrl-C in a notebook) gets its place and the signal."""
        handler = self._previous_handlers.get(signum)
        if handler is None:
            return
        signal.signal(signum, handler)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


def requeue_slurm_job() -> str | None:
    """Put this SLURM job back in the queue; its next start continues the run directory."""
    job = slurm_job_id()
    if job is None:
        return None
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return None
    return job


class FinalValidation(Callback):
    """Every run ends by validating its final weights, whatever `val_check_interval` is.

    Lightning validates every `val_check_interval` steps only, so a 300-step run validating
    every 250 would leave its last 50 steps unseen. `should_stop` on the final step makes
    Lightning validate before it stops; its val loss is the run's last point, checkpoint and
    summary.
    """

    def __init__(self) -> None:
        self._validated_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        final = optimizer_stepped(trainer, batch_idx) and is_final_step(trainer)
        if final and self._validated_step != trainer.global_step:
            trainer.should_stop = True
