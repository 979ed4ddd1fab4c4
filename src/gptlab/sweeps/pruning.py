"""Stop hopeless Optuna trials early: report every validation to the trial, prune when told.

The trial is found again through the study's storage, from the job's own process, so the
same callback works whether the sweep runs its trials in-process, in local workers or on
SLURM. conf/hparams_search/optuna.yaml adds it to Optuna sweeps only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from gptlab.errors import ConfigError
from gptlab.sweeps.optuna_study import (
    TRIAL_ENV,
    find_trial,
    hyperband_in_steps,
    make_pruner,
    open_storage,
    parse_storage,
)
from gptlab.training.steps import val_interval_in_steps

log = logging.getLogger(__name__)


class OptunaPruning(Callback):
    """Report `monitor` at each validation of `fit` (step = global step); prune when told.

    A pruned run raises `optuna.TrialPruned`: its record says `pruned` with its steps and
    best val loss so far, and the sweeper tells the study PRUNED.
    """

    def __init__(
        self,
        storage: str | None,
        sweep_dir: str,
        study_name: str,
        trial_number: int | str | None,
        pruner: str = "none",
        pruner_args: dict[str, Any] | None = None,
        monitor: str = "val/loss",
    ) -> None:
        if trial_number is None:
            raise ConfigError(
                f"callbacks.optuna_pruning reports to an Optuna trial, but this run is not one "
                f"({TRIAL_ENV} is not set): run it as an Optuna sweep, `python scripts/train.py "
                f"hparams_search=optuna`, or turn the callback off with "
                f"callbacks.optuna_pruning=null."
            )
        self.spec = parse_storage(storage, Path(sweep_dir))
        self.study_name = study_name
        self.trial_number = int(trial_number)
        self.pruner_name = pruner
        self.pruner_args = dict(pruner_args or {})
        make_pruner(pruner, self.pruner_args)  # bad arguments fail before the run starts
        self.monitor = monitor
        self.trial: optuna.Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING or not trainer.is_global_zero or self.trial is not None:
            return
        args = self.pruner_args
        if self.pruner_name == "hyperband":
            args = hyperband_in_steps(args, val_interval_in_steps(trainer), trainer.max_steps)
        pruner = make_pruner(self.pruner_name, args)
        storage = open_storage(self.spec)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
        self.trial = find_trial(study, storage, self.trial_number)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the untrained model's validation before fit is no step of the trial
        metrics = trainer.callback_metrics
        prune = False
        if trainer.is_global_zero and self.monitor in metrics:
            prune = self.report(float(metrics[self.monitor]), trainer.global_step)
        if trainer.strategy.broadcast(prune, src=0):
            value = float(metrics[self.monitor])
            message = (
                f"Trial {self.trial_number} pruned at step {trainer.global_step}: "
                f"{self.monitor} {value:.4f} is not promising"
            )
            log.info(message)
            raise optuna.TrialPruned(message)

    def report(self, value: float, step: int) -> bool:
        """Whether the trial should stop, after telling it `value` at `step`."""
        assert self.trial is not None, "setup() finds the trial before fit validates"
        try:
            self.trial.report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Its sweep was stopped and the study marked the trial failed: train on regardless.
            log.warning("Trial %d has already finished in the study", self.trial_number)
            return False
        return self.trial.should_prune()
