"""The Sweeper Hydra instantiates; the work is in `_impl`, which imports Optuna only when used,
so that gptlab without the sweep extra still starts without plugin warnings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from gptlab.errors import ConfigError, exit_with_message

T = TypeVar("T")


def report_config_error(call: Callable[[], T]) -> T:
    """A bad sweep setting (or a sweep whose every trial failed on one) ends as gptlab's
    scripts end: one paragraph and exit code 2; HYDRA_FULL_ERROR=1 shows the stack."""
    try:
        return call()
    except ConfigError as err:
        exit_with_message(err)


class GptlabOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        def start() -> None:
            try:
                from hydra_plugins.gptlab_optuna_sweeper._impl import OptunaSweep
            except ImportError as err:
                raise ConfigError(
                    f"hparams_search=optuna needs Optuna ({err}): install it with "
                    f'`pip install -e ".[sweep]"`.'
                ) from err
            self.impl = OptunaSweep(**self.settings)
            self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

        report_config_error(start)

    def sweep(self, arguments: list[str]) -> None:
        report_config_error(lambda: self.impl.sweep(arguments))
