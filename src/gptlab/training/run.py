"""One training run from a composed config: check, build the Trainer, load data, fit, report.

Shared by `gptlab-train` (`scripts/train.py`) and the tests, so both exercise the same path.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.data.datamodule import GPTDataModule
from gptlab.errors import ConfigError, StorageError, TrainingInterrupted
from gptlab.inference.generation import continue_prompt, encode_prompt
from gptlab.inference.loading import find_initial_weights, load_initial_weights
from gptlab.model.gpt import count_parameters
from gptlab.model.tokenizers import GPT2Tokenizer
from gptlab.runs import owned, requeued_checkpoint
from gptlab.schema import check_arguments
from gptlab.training.callbacks import checkpoint_callback
from gptlab.training.checkpoints import (
    LOGGER_RUNS,
    AtomicCheckpointIO,
    SavedRun,
    checkpoint_to_resume,
    last_checkpoint,
    saved_step,
)
from gptlab.training.flops import device_name
from gptlab.training.loggers import (
    OFFLINE_ENVIRONMENT,
    check_logger,
    continuing,
    finish_wandb_run,
    log_summary,
    logger_runs,
)
from gptlab.training.module import GPTLightningModule, check_vocab_size
from gptlab.training.monitor import TrainingMonitor, inference_model
from gptlab.training.records import RunRecord, error_line, status_of, write_run_record
from gptlab.training.settings import RunSettings, configure_matmul_precision

log = logging.getLogger(__name__)

# What `run` can return for sweepers to minimise, read from the run's record.
OPTIMIZED_METRICS: dict[str, Callable[[RunRecord], float]] = {
    "val/loss": lambda record: record.best_val_loss,
    "val/ppl": lambda record: record.val_ppl,
}
# OSError numbers that mean the disk, not the program, failed the run.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def validate(cfg: DictConfig, resumed: SavedRun | None = None) -> tuple[RunSettings, GPTDataModule]:
    """Check what can be checked without data, so mistakes cost seconds, not a data load.

    The data module is built (not loaded) here, which checks the data group's values.
    """
    settings = RunSettings.from_cfg(cfg)
    for key, target, values in group_nodes(cfg, "callbacks"):
        check_arguments(key, target, values)
    for key, target, values in group_nodes(cfg, "logger"):
        check_logger(key, target, values)
    datamodule = GPTDataModule.from_config(OmegaConf.to_container(cfg.data, resolve=True))
    datamodule.connect(settings.tokenizer, settings.model["context_length"])
    if settings.tokenizer == "gpt2" and settings.model["vocab_size"] is not None:
        check_vocab_size(settings.model["vocab_size"], GPT2Tokenizer())
    accumulation = settings.optimizer.accumulation(
        datamodule.batch_size, datamodule.context_length, settings.trainer.world_size
    )
    settings = dataclasses.replace(settings, accumulation=accumulation)
    if resumed is not None:
        resumed.check_fits(settings.model, settings.tokenizer)
        resumed.check_optimizer(settings.optimizer.name)
    if cfg.get("init_from"):
        find_initial_weights(cfg.init_from)
    return settings, datamodule


def group_nodes(cfg: DictConfig, group: str) -> Iterator[tuple[str, type, dict[str, Any]]]:
    """A group's nodes that are set, as (`group.name`, the `_target_` class, resolved values)."""
    for name, node in (cfg.get(group) or {}).items():
        if node is not None:
            values = OmegaConf.to_container(node, resolve=True)
            yield f"{group}.{name}", get_class(node._target_), values


def run_to_resume(cfg: DictConfig, run_dir: Path) -> SavedRun | None:
    """The run this one continues: `resume=`, `ckpt_path=`, or a requeued SLURM job's own."""
    ckpt_path = checkpoint_to_resume(cfg.get("resume"), cfg.get("ckpt_path"))
    ckpt_path = ckpt_path or requeued_checkpoint(run_dir)
    return SavedRun.read(ckpt_path) if ckpt_path else None


def instantiate_group(
    cfg: DictConfig, group: str, arguments: Mapping[str, dict[str, Any]] | None = None
) -> list:
    """A group's objects (callbacks, loggers), each built by Hydra from its `_target_` with
    any further `arguments` given for its `group.name`.

    A constructor's own complaint about its arguments becomes one paragraph naming the node;
    gptlab's ConfigError stays as it is.
    """
    built = []
    for name, node in (cfg.get(group) or {}).items():
        if node is None:
            continue
        try:
            built.append(instantiate(node, **(arguments or {}).get(f"{group}.{name}", {})))
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            if isinstance(cause, TypeError | ValueError):
                raise ConfigError(
                    f"{group}.{name} could not be built from its settings: {cause} Check its "
                    f"keys against conf/{group}/ and {node._target_}."
                ) from None
            raise
    return built


def build_strategy(node: dict, world_size: int) -> object:
    """A strategy from its config. ModelParallelStrategy's `data_parallel_size: null` (what
    `trainer=fsdp` sets) shards over every process: FSDP2 alone, no tensor parallelism."""
    if node.get("save_distributed_checkpoint"):
        raise ConfigError(
            "trainer.strategy.save_distributed_checkpoint=true writes each rank's shard into a "
            "folder, which gptlab's resume, generate.py and evaluate.py do not read: keep it "
            "false (one consolidated checkpoint file, gathered on rank 0)."
        )
    if "data_parallel_size" in node and node["data_parallel_size"] is None:
        node = {**node, "data_parallel_size": world_size}
    return instantiate(node, _convert_="all")


def build_trainer(
    cfg: DictConfig,
    settings: RunSettings,
    resumed: SavedRun | None = None,
    recorder: RunRecorder | None = None,
) -> L.Trainer:
    """The Trainer with its callbacks (the run's `recorder` last) and loggers; steps are
    optimizer steps throughout.

    Everything is decided before it is built (accumulation from the world size, the untrained
    validation for new runs only), so nothing is changed on it afterwards.
    """
    options = settings.trainer.lightning_options(
        settings.accumulation, validate_untrained=not resumed
    )
    if isinstance(options.get("strategy"), dict):
        options["strategy"] = build_strategy(options["strategy"], settings.trainer.world_size)
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # gptlab's GracefulInterrupt saves at a step boundary and requeues on SIGUSR1.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    callbacks = instantiate_group(cfg, "callbacks")
    if not options.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false alone turns the bar off, as Lightning users expect.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # callbacks.checkpoint=null: Lightning would add its own, saving at every epoch's end.
        options.setdefault("enable_checkpointing", False)
    if recorder is not None:
        callbacks.append(recorder)
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    runs = resumed.logger_runs if resumed is not None else {}
    continued = {
        key: continuing(target, values, runs) for key, target, values in group_nodes(cfg, "logger")
    }
    loggers = instantiate_group(cfg, "logger", continued)
    try:
        return L.Trainer(**options, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(
            f"The trainer settings do not work here: {str(err).strip()} Check the trainer.* "
            f"values (see conf/trainer/)."
        ) from None


def best_val_loss(trainer: L.Trainer) -> float:
    """The lowest val loss so far, the last validation's included: a pruner stops a run inside
    that validation, before the checkpoint callback has seen its score."""
    checkpoint = trainer.checkpoint_callback
    scores = [
        trainer.callback_metrics.get("val/loss"),
        checkpoint.best_model_score if checkpoint is not None else None,
    ]
    finite = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    return min(finite, default=float("nan"))


def task_overrides() -> list[str]:
    """This run's command-line overrides (in a sweep: its trial's values)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


@dataclasses.dataclass(eq=False)
class RunRecorder(Callback):
    """Keeps `<run dir>/run_summary.json` true to the run, whatever ends it, and hands the
    record's numbers to every logger as `summary/<field>` metrics when fit ends or fails,
    before Lightning closes the loggers.

    A resume that fails before training starts leaves the earlier run's record as it was;
    a record that cannot be written (a full disk) is logged, not allowed to hide the error.
    """

    run_dir: Path
    overrides: list[str]
    resuming: bool
    started: float = dataclasses.field(default_factory=time.perf_counter)
    trainer: L.Trainer | None = None
    training: bool = False

    def write(self, record: RunRecord) -> None:
        try:
            rank_zero_only(write_run_record)(self.run_dir, record)
        except OSError as err:
            log.warning("Could not write %s's record: %s", self.run_dir, err)

    def start(self, trainer: L.Trainer) -> None:
        self.trainer, self.training = trainer, True
        self.write(RunRecord("running", self.overrides))

    def record(self, status: str, error: BaseException | None = None) -> RunRecord:
        """The run as it stands, ended by `status` (and `error`)."""
        record = RunRecord(
            status,
            self.overrides,
            wall_time_s=time.perf_counter() - self.started,
            error=error_line(error) if error is not None else None,
        )
        if self.trainer is not None:
            best = best_val_loss(self.trainer)
            monitor = next(
                (c for c in self.trainer.callbacks if isinstance(c, TrainingMonitor)), None
            )
            record.best_val_loss = best if math.isfinite(best) else None
            record.val_ppl = math.exp(best) if math.isfinite(best) else None
            record.steps = self.trainer.global_step
            record.tokens_seen = monitor.tokens_seen if monitor else None
            record.tokens_per_sec = monitor.run_tokens_per_sec if monitor else None
            validations = monitor.val_losses if monitor else []
            untrained = [loss for _, step, loss in validations if step == 0]
            record.untrained_val_loss = untrained[0] if untrained else None
            record.device = device_name(self.trainer.strategy.root_device)
            record.precision = str(self.trainer.precision)
            record.float32_matmul_precision = torch.get_float32_matmul_precision()
        return record

    def end(self, status: str, error: BaseException | None = None) -> RunRecord:
        record = self.record(status, error)
        if self.training or not self.resuming:
            self.write(record)
        return record

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_summary(trainer, self.record("completed"))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[LOGGER_RUNS] = logger_runs(trainer.loggers)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        try:
            log_summary(trainer, self.record(status_of(exception), exception))
        except Exception as err:  # a logger that fails too must not hide the run's own error
            log.warning("Could not log the run's summary: %s", err)


def run(cfg: DictConfig) -> float:
    """Train as `cfg` says and return `cfg.optimized_metric`, which sweepers minimise.

    Leaves `<run dir>/run_summary.json` for sweep summaries, whether the run completes or fails.
    """
    run_dir = Path(cfg.paths.output_dir)
    with owned(run_dir):
        # A resume that fails here leaves the earlier run's record as it was.
        resumed = run_to_resume(cfg, run_dir)
        recorder = RunRecorder(run_dir, task_overrides(), resuming=resumed is not None)
        try:
            settings, datamodule = validate(cfg, resumed)
            fit(cfg, settings, datamodule, recorder, resumed)
        except TrainingInterrupted as err:
            recorder.end(status_of(err), err)
            err.resume_hint = resume_hint(run_dir)
            raise
        except OSError as err:
            recorder.end("failed", err)
            if err.errno in STORAGE_ERRNOS:
                raise storage_error(err, run_dir) from None
            raise
        except Exception as err:
            recorder.end(status_of(err), err)
            raise
        record = recorder.end("completed")
    if record.best_val_loss is None:
        return math.nan
    return OPTIMIZED_METRICS[cfg.optimized_metric](record)


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run, or that there is nothing to continue from."""
    last = last_checkpoint(run_dir)
    if not last.is_file():
        return "No checkpoint had been saved, so there is nothing to resume."
    return (
        f"Continue with `python scripts/train.py <same options> resume={run_dir}` "
        f"({last.name} holds step {saved_step(last)})."
    )


def storage_error(err: OSError, run_dir: Path) -> StorageError:
    """A full disk (or quota, or read-only mount) as one paragraph with the way back."""
    where = f" {err.filename}" if err.filename else f" into {run_dir}"
    return StorageError(
        f"Could not write{where} ({err.strerror}): the run stopped, and every file it had "
        f"written before is intact. Free some space (or fix the mount). {resume_hint(run_dir)}",
    )


def fit(
    cfg: DictConfig,
    settings: RunSettings,
    datamodule: GPTDataModule,
    recorder: RunRecorder,
    resumed: SavedRun | None,
) -> L.Trainer:
    """Build the Trainer, load the data and the model, fit (a new run validates its untrained
    model first, inside `fit`), report."""
    L.seed_everything(settings.seed, workers=True)
    configure_matmul_precision(settings.trainer.device_type)
    trainer = build_trainer(cfg, settings, resumed, recorder)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    if resumed is not None:
        resumed.check_tokenizer(tokenizer)
    prompt = encode_prompt(tokenizer, cfg.prompt, key="prompt")
    module = GPTLightningModule(
        model=settings.model_config(tokenizer.vocab_size),
        optimizer=settings.optimizer,
        tokenizer=tokenizer.to_dict(),
        compile=settings.compile,
        compile_mode=settings.compile_mode,
        activation_checkpointing=settings.activation_checkpointing,
    )
    if cfg.get("init_from"):
        load_initial_weights(module, cfg.init_from)
        log.info("Initial weights from %s", cfg.init_from)
    log.info(
        "Model: %s parameters; tokenizer %s with %s tokens; %s train and %s val tokens",
        f"{count_parameters(module.model):,}",
        tokenizer.name,
        f"{tokenizer.vocab_size:,}",
        f"{len(datamodule.train_tokens):,}",
        f"{len(datamodule.val_tokens):,}",
    )
    recorder.start(trainer)
    ckpt_path = str(resumed.path) if resumed is not None else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        finish_wandb_run(trainer, exit_code=1)
        raise
    finish_wandb_run(trainer, exit_code=0)
    # Whole weights to sample from: under FSDP every rank takes part in gathering them.
    model = inference_model(trainer, module)
    if trainer.is_global_zero:
        report(cfg, trainer, module, model, prompt, best_val_loss(trainer))
    return trainer


def report(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: GPTLightningModule,
    model: torch.nn.Module,
    prompt: list[int],
    result: float,
) -> None:
    """What a user wants to see when a run ends: numbers, where things are, a sample."""
    checkpoint = checkpoint_callback(trainer)
    if math.isfinite(result):
        print(f"Best val loss: {result:.4f} (perplexity {math.exp(result):.2f})")
    if checkpoint is not None:
        print(f"Best checkpoint: {checkpoint.best_model_path}")
        print(f"Last checkpoint: {checkpoint.last_path}")
    print(f"TensorBoard: tensorboard --logdir {cfg.paths.output_dir}")
    tokens = continue_prompt(
        model, prompt, cfg.max_new_tokens, context_length=module.config.context_length
    )
    print(f"Greedy continuation of {cfg.prompt!r}:")
    print(module.tokenizer.decode(tokens))
