"""Ask Optuna for trials, hand them to Hydra's launcher as overrides, tell the results.

The study lives in a storage (a journal file by default), so a sweep that is run again
continues it, several sweeps can share it, and each job finds its trial there to report
validations to (`gptlab.sweeps.pruning`). Hydra's launcher runs the jobs: in this process, in
local processes, or on SLURM through hydra-submitit-launcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from gptlab.atomic import atomic_write_text
from gptlab.checks import check_count
from gptlab.errors import ConfigError
from gptlab.overrides import parse_overrides
from gptlab.sweeps.optuna_study import (
    TRIAL_ENV,
    StorageSpec,
    count_states,
    exclusive,
    fail_stale_trials,
    heartbeat,
    make_pruner,
    make_sampler,
    open_storage,
    parse_storage,
    trial_id,
)
from gptlab.training.records import error_line

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")


def distribution(override: Override) -> BaseDistribution:
    """Optuna's distribution for a sweep override, as hydra-optuna-sweeper reads them.

    `interval(a, b)`: float (int when both ends are ints); `tag(log, interval(a, b))`: log
    scale; `choice(a, b, ...)` or `a,b,...`: categorical; `range(a, b, step)`: stepped ints,
    or floats when any bound is one.
    """
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if isinstance(value, RangeSweep):
        if value.shuffle:
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            return CategoricalDistribution(choices)
        # range() excludes its end, as in Python; Optuna's bounds are inclusive.
        values = list(override.sweep_iterator())
        low, high, step = min(values), max(values), abs(value.step)
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(low, high, step=step)
        return IntDistribution(int(low), int(high), step=int(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ConfigError(
        f"{override.input_line} is not a search space Optuna can sample: use "
        f"interval(a, b), tag(log, interval(a, b)), choice(a, b, ...) or range(a, b, step)."
    )


@dataclasses.dataclass
class SearchSpace:
    """What each trial samples, and the overrides every trial gets as they are."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]

    @classmethod
    def parse(cls, params: dict[str, Any], arguments: Sequence[str]) -> SearchSpace:
        """`hydra.sweeper.params`, then the command line, where a key set to one value is fixed.

        A command-line sweep such as `optimizer.lr=tag(log, interval(1e-5, 1e-3))` replaces
        the range in `params`; `optimizer.lr=3e-4` takes optimizer.lr out of the search.
        """
        configured = [f"{key}={value}" for key, value in params.items()]
        lines = [*configured, *arguments]
        distributions: dict[str, BaseDistribution] = {}
        fixed: dict[str, str] = {}
        for line, override in zip(lines, parse_overrides(lines), strict=True):
            key = override.get_key_element()
            if override.is_sweep_override():
                fixed.pop(key, None)
                distributions[key] = distribution(override)
            else:
                distributions.pop(key, None)
                fixed[key] = line
        return cls(distributions, list(fixed.values()))

    def overrides(self, params: dict[str, Any]) -> list[str]:
        sampled = [f"{key}={Transformer.str(params[key])}" for key in self.distributions]
        return [*self.fixed, *sampled]


class OptunaSweep(Sweeper):
    """The sweep itself; `GptlabOptunaSweeper` hands Hydra's calls to it."""

    def __init__(
        self,
        direction: str,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig | dict[str, Any],
        pruner: str,
        pruner_args: DictConfig | dict[str, Any],
        stale_after_s: float,
        params: DictConfig | dict[str, Any] | None,
    ) -> None:
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = dict(sampler)
        self.pruner = pruner
        self.pruner_args = OmegaConf.to_container(pruner_args) if pruner_args else {}
        self.stale_after_s = stale_after_s
        self.params = dict(params or {})
        self.check_settings()

    def check_settings(self) -> None:
        """Bad settings stop the sweep before its first trial, naming the key and the fix."""
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                f"hydra.sweeper.direction={self.direction!r} is unknown: use minimize or maximize."
            )
        for key in ("n_trials", "n_jobs"):
            check_count(f"hydra.sweeper.{key}", getattr(self, key), 1)
        if self.stale_after_s <= 0:
            raise ConfigError(
                f"hydra.sweeper.stale_after_s={self.stale_after_s} must be positive: it is how "
                f"long a running trial may go without a heartbeat before it counts as killed."
            )
        make_pruner(self.pruner, self.pruner_args)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        space = SearchSpace.parse(self.params, arguments)
        spec = parse_storage(self.storage, self.sweep_dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(spec)
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            direction=self.direction,
            pruner=make_pruner(self.pruner, self.pruner_args),
            load_if_exists=True,
        )
        stale = fail_stale_trials(study, storage, self.stale_after_s)
        counts = count_states(study.get_trials(deepcopy=False))
        log.info(
            "Study %s in %s: %s so far (failed as stale: %s); n_trials=%d in all",
            self.study_name,
            spec,
            ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no trials",
            stale or "none",
            self.n_trials,
        )
        states: list[TrialState] = []
        last_error: BaseException | None = None
        while trials := self.ask(study, storage, spec.lock_path, space):
            overrides = [self.job_overrides(space, trial) for trial in trials]
            self.validate_batch_is_legal(overrides)
            trial_ids = [trial_id(storage, self.study_name, trial.number) for trial in trials]
            try:
                with heartbeat(storage, trial_ids, self.stale_after_s / 4):
                    returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            except BaseException:
                # Ctrl-C or a launcher that broke: these trials will never report back.
                for trial in trials:
                    self.tell(study, trial, TrialState.FAIL)
                raise
            for trial, job in zip(trials, returns, strict=True):
                state, error = self.outcome(job)
                states.append(self.tell(study, trial, state, job))
                if error is not None:
                    last_error = error
                    log.warning("Trial %d failed: %s", trial.number, error_line(error))
        self.write_results(study, spec)
        if states and last_error is not None and all(s == TrialState.FAIL for s in states):
            raise last_error

    def ask(
        self,
        study: optuna.Study,
        storage: BaseStorage,
        lock_path: Path | None,
        space: SearchSpace,
    ) -> list[optuna.Trial]:
        """Up to n_jobs new trials, or none once the study holds n_trials."""
        with exclusive(lock_path):
            fail_stale_trials(study, storage, self.stale_after_s)
            existing = len(study.get_trials(deepcopy=False))
            trials = []
            for offset in range(min(self.n_jobs, self.n_trials - existing)):
                study.sampler = make_sampler(
                    self.sampler.get("seed"),
                    existing + offset,
                    self.sampler.get("n_startup_trials", 10),
                )
                trials.append(study.ask(space.distributions))
            return trials

    def job_overrides(self, space: SearchSpace, trial: optuna.Trial) -> list[str]:
        """The trial's overrides and the environment variable by which its job finds the trial
        (`gptlab.sweeps.pruning`). Jobs are numbered by trial, so a run directory is
        `<sweep dir>/<trial number>-<its parameters>` even across workers and resumes."""
        return [*space.overrides(trial.params), f"++hydra.job.env_set.{TRIAL_ENV}={trial.number}"]

    @staticmethod
    def outcome(job: JobReturn) -> tuple[TrialState, BaseException | None]:
        if job.status == JobStatus.COMPLETED:
            return TrialState.COMPLETE, None
        try:
            # Hydra re-raises a failed job's error here, after printing "Error executing job",
            # which a pruned trial is not: that line is dropped.
            with contextlib.redirect_stderr(io.StringIO()):
                job.return_value  # noqa: B018
        except optuna.TrialPruned:
            return TrialState.PRUNED, None
        except BaseException as error:
            return TrialState.FAIL, error
        return TrialState.FAIL, None

    @staticmethod
    def tell(
        study: optuna.Study, trial: optuna.Trial, state: TrialState, job: JobReturn | None = None
    ) -> TrialState:
        """Tell the study how the trial ended; return the state it was recorded with."""
        try:
            if state == TrialState.COMPLETE:
                return study.tell(trial, float(job.return_value)).state
            return study.tell(trial, state=state).state
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale by another worker while it ran: keep what the study says.
            return study.get_trials(deepcopy=False)[trial.number].state

    def write_results(self, study: optuna.Study, spec: StorageSpec) -> None:
        """`optimization_results.yaml` in the sweep directory: the best trial so far."""
        trials = study.get_trials(deepcopy=False)
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": str(spec),
            "trials": count_states(trials),
        }
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
        path = self.sweep_dir / "optimization_results.yaml"
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(results)))
        log.info("Best parameters so far: %s", path)
