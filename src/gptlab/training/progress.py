"""The console's progress bar: one bar for the whole run, in optimizer steps, with an ETA.

Lightning's bar counts the batches of each epoch and starts again at every epoch, so a run
of 1000 steps over 5 epochs never says how far along it is.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm

from gptlab.training.callbacks import GracefulInterrupt

log = logging.getLogger(__name__)

INTERRUPT_HINT = (
    "Ctrl-C (or SIGTERM) saves a checkpoint after the current step and stops training; a "
    "second Ctrl-C stops at once."
)


def format_metric(name: str, value: Any) -> str:
    """Short and fixed-width enough not to jitter: loss 4.234, lr 3.0e-04, tok/s 91,370."""
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    key = name.rsplit("/", 1)[-1]
    if key == "lr" or key.startswith("lr-"):  # LearningRateMonitor names it lr-<optimizer>
        return f"{value:.1e}"
    if "tok" in name:
        return f"{value:,.0f}"
    return f"{value:#.4g}".rstrip(".")


class RunProgressBar(TQDMProgressBar):
    """Training progress as optimizer steps out of the run's total, from start to end.

    A TQDMProgressBar, so that Lightning's validation, test and predict bars, printing
    through the bar, silence on ranks other than 0 and `TQDM_MINITERS` all stay as they are;
    only the training bar changes. It is created once, when the first epoch starts, at the
    resumed step (tqdm's ETA then counts only this run's speed), and counts
    `trainer.global_step`: with gradient accumulation one step is several batches. The
    postfix holds the metrics logged with `prog_bar=True`, read only when the bar refreshes
    (every `refresh_rate` steps), because turning logged GPU tensors into numbers waits for
    the GPU.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"

    def __init__(self, refresh_rate: int = 10, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self._shown_step = -1
        self._drawn = False

    @property
    def train_description(self) -> str:
        return f"Epoch {self.trainer.current_epoch}"

    def init_train_tqdm(self) -> tqdm:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        return tqdm(
            desc=self.train_description,
            total=None if math.isinf(total) else total,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    @property
    def sanity_check_description(self) -> str:
        return "Validating the untrained model"

    def init_sanity_tqdm(self) -> tqdm:
        """gptlab's sanity check is the untrained model's validation, drawn as one."""
        return self.init_validation_tqdm()

    def init_validation_tqdm(self) -> tqdm:
        """Below the training bar, and gone when done: val/loss goes to the training postfix."""
        sanity = self.trainer.sanity_checking
        has_main_bar = self.trainer.state.fn != "validate" and not sanity
        return tqdm(
            desc=self.sanity_check_description if sanity else self.validation_description,
            position=2 * self.process_position + has_main_bar,
            disable=self.is_disabled,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=TQDMProgressBar.BAR_FORMAT,
        )

    def on_train_start(self, *_: Any) -> None:
        """No bar yet: it is drawn when the first epoch starts, once every callback has started."""
        self._drawn = False

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if not self._drawn:
            self.draw(trainer)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_description(self.train_description)

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """A run resumed inside an epoch starts no epoch: its bar is drawn at its first batch."""
        if not self._drawn:
            self.draw(trainer)

    def draw(self, trainer: L.Trainer) -> None:
        # After GracefulInterrupt.setup, so the hint is said only once Ctrl-C
        # does what it says, and before the bar is drawn, so it gets a line of its own.
        interruptible = any(isinstance(c, GracefulInterrupt) for c in trainer.callbacks)
        on_main_thread = threading.current_thread() is threading.main_thread()
        if interruptible and on_main_thread and trainer.is_global_zero:
            log.info(INTERRUPT_HINT)
        self.train_progress_bar = self.init_train_tqdm()
        self._drawn = True
        self._shown_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        due = step % self.refresh_rate == 0 or step == self.train_progress_bar.total
        if step != self._shown_step and self.is_enabled and due:
            self._show(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._drawn:  # ended before its first epoch started
            return
        self._show(trainer, pl_module)
        self.train_progress_bar.close()

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        self._shown_step = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.n = trainer.global_step
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        """The `prog_bar=True` metrics, formatted; no `v_num`: the run directory names the run."""
        metrics = trainer.progress_bar_metrics
        return {name: format_metric(name, value) for name, value in metrics.items()}
