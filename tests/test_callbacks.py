"""The callbacks that keep a run safe: the nan guard in both modes, the final validation."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import cpu_trainer
from gptlab.errors import NonFiniteLossError, StoppedBeforeTraining
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.callbacks import (
    FinalValidation,
    GracefulInterrupt,
    NonFiniteLossGuard,
)
from gptlab.training.module import GPTLightningModule


def tiny_module(lr: float, fused: bool = False) -> GPTLightningModule:
    torch.manual_seed(0)
    return GPTLightningModule(
        {"vocab_size": 16, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1},
        {"lr": lr, "fused": fused},
        CharTokenizer("abcdefghijklmnop").to_dict(),
    )


def weights_finite(module: GPTLightningModule) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize(
    ("check", "fused", "stopped_at", "words", "finite"),
    [
        # Read before backward: the bad step never runs.
        ("every_step", False, 2, "so that step was not applied", True),
        # Read only on written steps (no GPU stall): a fused AdamW skips bad steps itself...
        ("log_steps", True, 2, "fused AdamW skipped them", True),
        # ... while the foreach AdamW applies them, which the message says.
        ("log_steps", False, 2, "they reached the weights", False),
    ],
)
def test_nan_guard_stops_the_run_in_both_modes(
    tmp_path: Path, check: str, fused: bool, stopped_at: int, words: str, finite: bool
) -> None:
    module = tiny_module(lr=1e30, fused=fused)  # so large that step 2's loss is not finite
    trainer = cpu_trainer(
        tmp_path,
        max_steps=12,
        log_every_n_steps=4,
        enable_checkpointing=False,
        callbacks=[NonFiniteLossGuard(check=check)],
    )
    with pytest.raises(NonFiniteLossError, match=words) as err:
        trainer.fit(module, train_dataloaders=random_batches(16, 8, batch_size=2, n=12))
    assert f"Training stopped at step {stopped_at}:" in str(err.value)
    assert weights_finite(module) is finite
    if check == "log_steps":
        # Found on the first written step: no read of the device before it.
        assert trainer.global_step == 4


def test_final_validation_runs_when_the_interval_does_not_reach_the_end(tmp_path: Path) -> None:
    module = tiny_module(lr=1e-3)
    validated: list[int] = []

    class Recorder(FinalValidation):
        def on_validation_end(self, trainer, pl_module) -> None:
            super().on_validation_end(trainer, pl_module)
            validated.append(trainer.global_step)

    batches = random_batches(16, 8, batch_size=2, n=7)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=7,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        callbacks=[Recorder()],
    )
    trainer.fit(module, train_dataloaders=batches, val_dataloaders=batches)
    assert validated == [5, 7]


class CtrlCWhileValidatingUntrained(Callback):
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_the_untrained_validation_stops_before_training(tmp_path: Path) -> None:
    module = tiny_module(lr=1e-3)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        num_sanity_val_steps=-1,  # the untrained model's validation, as gptlab runs it
        enable_checkpointing=False,
        callbacks=[GracefulInterrupt(), CtrlCWhileValidatingUntrained()],
    )
    loader = random_batches(16, 8, batch_size=2, n=8)
    with pytest.raises(StoppedBeforeTraining, match="Stopped by Ctrl-C before training started"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 0
    assert not list(tmp_path.rglob("*.ckpt"))


class FailsAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("a failure mid-training")


@pytest.mark.parametrize("fails", [False, True], ids=["completes", "fails"])
def test_ctrl_c_interrupts_the_caller_again_after_fit(tmp_path: Path, fails: bool) -> None:
    """In a notebook or any in-process use, Ctrl-C must interrupt the caller once fit is over,
    however it ended, not request a stop from a finished run."""
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        callbacks=[GracefulInterrupt(), *([FailsAtStep(2)] if fails else [])],
    )
    loader = random_batches(16, 8, batch_size=2, n=8)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        trainer.fit(tiny_module(lr=1e-3), train_dataloaders=loader)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; this sleep is not reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
