"""The `logger` group beyond building it: each logger's packages, arguments and tracking server
checked before any data loads, calls home switched off, the run's summary and end handed to
every logger, and a resumed run logging into the MLflow and W&B runs its first start opened.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
from hydra.utils import get_object
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from gptlab.errors import ConfigError
from gptlab.schema import check_arguments
from gptlab.training.records import RunRecord

log = logging.getLogger(__name__)

# Loggers that hand the keyword arguments they do not take to a class or function of their own.
FORWARDED_ARGUMENTS = {
    TensorBoardLogger: "torch.utils.tensorboard.SummaryWriter",
    WandbLogger: "wandb.init",
}
# The modules a logger needs beyond gptlab's dependencies, and the extra that installs them.
LOGGER_EXTRAS = {MLFlowLogger: ("mlflow", ["mlflow"]), WandbLogger: ("wandb", ["wandb"])}
# MLflow opens a database store (sqlite, its default here) through these, in its extra too.
DATABASE_MODULES = ["sqlalchemy", "alembic"]
DATABASE_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql"}
# Calls home that the loggers' packages make unless told not to, none of them the run's own
# tracking: MLflow 3's usage telemetry and W&B's crash reports. A value the user set is kept.
OFFLINE_ENVIRONMENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_ERROR_REPORTING": "false"}
# How long an http(s) tracking server may take to answer before the run is refused.
TRACKING_TIMEOUT_S = 5.0


def for_class(table: Mapping[type, Any], target: type, default: Any = None) -> Any:
    """`table`'s entry for `target` or the nearest class it derives from."""
    return next((table[cls] for cls in target.__mro__ if cls in table), default)


def passed_on(target: type) -> Callable[..., Any] | None:
    """What a logger hands the keyword arguments it does not take to, if anything."""
    name = for_class(FORWARDED_ARGUMENTS, target)
    return get_object(name) if name else None


def check_logger(key: str, target: type, values: dict[str, Any]) -> None:
    """A logger's packages, arguments and tracking server, checked before any data loads:
    Lightning would fail only when the logger first writes, and MLflow's client retries a
    server that does not answer for minutes."""
    extra, modules = for_class(LOGGER_EXTRAS, target, ("", []))
    uri = values.get("tracking_uri") if issubclass(target, MLFlowLogger) else None
    if isinstance(uri, str) and uri.split(":")[0].split("+")[0] in DATABASE_SCHEMES:
        modules = [*modules, *DATABASE_MODULES]
    missing = next((m for m in modules if importlib.util.find_spec(m) is None), None)
    if missing is not None:
        raise ConfigError(
            f"{key} needs the {missing} package, which is not installed here: install "
            f"gptlab's {extra} extra (pip install -e \".[{extra}]\" in gptlab's folder), or "
            f"choose another logger, such as logger=tensorboard."
        )
    check_arguments(key, target, values, passed_on(target))
    if isinstance(uri, str) and uri.startswith(("http://", "https://")):
        check_reachable(f"{key}.tracking_uri", uri)


def check_reachable(key: str, uri: str) -> None:
    """An http(s) tracking server must answer now, not once training has begun."""
    try:
        urllib.request.urlopen(uri, timeout=TRACKING_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered, if only with an error status for this path
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"{key}={uri!r} does not answer ({reason}): start the tracking server or correct "
            f"the address, or drop the override to keep the runs in the local store, "
            f"sqlite:///<paths.log_dir>/mlflow.db."
        ) from None


def log_summary(trainer: L.Trainer, record: RunRecord) -> None:
    """The record's numbers (best val loss, steps, tokens/s...) as `summary/<field>` metrics of
    every logger, at the last step."""
    numbers = {
        f"summary/{name}": float(value)
        for name, value in dataclasses.asdict(record).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)


def finish_wandb_run(trainer: L.Trainer, exit_code: int) -> None:
    """End this training's W&B run: W&B keeps a run open until the process exits, so the next
    job of a sweep in this process would log into it (Lightning's WandbLogger reuses it)."""
    wandb = sys.modules.get("wandb")
    ours = any(isinstance(logger, WandbLogger) for logger in trainer.loggers)
    if ours and wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


def flat_hparams(
    config: Mapping[str, Any], prefix: str = ""
) -> dict[str, bool | int | float | str]:
    """Nested settings as the HParams tab takes them: `model/emb_dim` keys, scalar values."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger for a run that may be resumed into the MLflow run it opened.

    MLflow keeps a parameter's first value and refuses another, which would end the run where
    a resumed start changes a setting (`trainer.max_steps`, to train on). So a parameter the
    run holds already is not logged again, and a continued run is marked running again.
    """

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        run = self.experiment.get_run(self.run_id)
        logged = run.data.params
        if logged and run.info.status != "RUNNING":
            self.experiment.update_run(self.run_id, status="RUNNING")
        new = {key: value for key, value in flat_hparams(params).items() if key not in logged}
        if new:
            super().log_hyperparams(new)


def logger_runs(loggers: Sequence[Logger]) -> dict[str, str]:
    """The MLflow and W&B runs these loggers write to, for the checkpoint to keep, so that a
    resumed run continues them (other ranks' loggers have none)."""
    runs: dict[str, str] = {}
    for logger in loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id:
            runs.setdefault("mlflow", logger.run_id)
        elif isinstance(logger, WandbLogger) and logger.version:
            runs.setdefault("wandb", logger.version)
    return runs


def continuing(target: type, values: Mapping[str, Any], runs: Mapping[str, str]) -> dict[str, Any]:
    """The arguments that make a logger of a resumed run continue the run its checkpoint
    names, unless the config names a run itself. A run the MLflow store no longer holds (the
    store was moved or deleted) gives way to a new run, with a warning."""
    if issubclass(target, MLFlowLogger) and values.get("run_id") is None and "mlflow" in runs:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient(values.get("tracking_uri")).get_run(runs["mlflow"])
        except MlflowException:
            log.warning(
                "The MLflow run %s that this run logged to is not in %s: a new run starts.",
                runs["mlflow"],
                values.get("tracking_uri"),
            )
            return {}
        return {"run_id": runs["mlflow"]}
    if issubclass(target, WandbLogger) and values.get("id") is None and "wandb" in runs:
        return {"id": runs["wandb"], "resume": "allow"}
    return {}
