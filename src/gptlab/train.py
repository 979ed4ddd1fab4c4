"""One training run from a composed config: validate, load data, fit, report.

Shared by `scripts/train.py` and the tests, so both exercise the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.callbacks import TrainingCurves
from gptlab.data import GPTDataModule
from gptlab.errors import ConfigError, TrainingInterrupted
from gptlab.generation import check_sampling, encode_prompt, generate
from gptlab.loading import find_initial_weights, load_initial_weights
from gptlab.model import GPTConfig, count_parameters
from gptlab.module import GPTLightningModule, check_optimizer, check_vocab_size
from gptlab.resume import (
    check_checkpoint_fits,
    check_checkpoint_tokenizer,
    checkpoint_to_resume,
)
from gptlab.sweep import RunRecord, error_line, write_run_record
from gptlab.tokenizers import TOKENIZER_NAMES, GPT2Tokenizer

log = logging.getLogger(__name__)

# What `run` can return for sweepers to minimise, read from the run's record.
OPTIMIZED_METRICS: dict[str, Callable[[RunRecord], float]] = {
    "val/loss": lambda record: record.best_val_loss,
    "val/ppl": lambda record: record.val_ppl,
}
record_run = rank_zero_only(write_run_record)
MODEL_KEYS = {field.name for field in dataclasses.fields(GPTConfig)}
RUN_MODEL_KEYS = {"tokenizer", "compile"}


def model_settings(model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """GPTConfig arguments from the `model` group; a null vocab_size follows the tokenizer."""
    settings = {key: value for key, value in model.items() if key not in RUN_MODEL_KEYS}
    unknown = sorted(set(settings) - MODEL_KEYS)
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a model setting: use one of "
            f"{', '.join(sorted(MODEL_KEYS | RUN_MODEL_KEYS))}."
        )
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = vocab_size
    return settings


def validate(cfg: DictConfig) -> None:
    """Check what can be checked without data, so mistakes cost seconds, not a data load."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("tokenizer") not in TOKENIZER_NAMES:
        raise ConfigError(
            f"model.tokenizer={model.get('tokenizer')!r} is unknown: use one of "
            f"{', '.join(TOKENIZER_NAMES)}."
        )
    GPTConfig(**model_settings(model, vocab_size=1))
    if model["tokenizer"] == "gpt2" and model.get("vocab_size") is not None:
        check_vocab_size(model["vocab_size"], GPT2Tokenizer())
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    check_optimizer(optimizer)
    check_run_length(cfg.trainer, optimizer)
    check_sampling(0.0, None, None, cfg.max_new_tokens)
    if cfg.optimized_metric not in OPTIMIZED_METRICS:
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric!r} is unknown: use one of "
            f"{', '.join(OPTIMIZED_METRICS)}."
        )
    if cfg.get("tokens_per_step"):
        # The world size is checked again once the Trainer knows it.
        accumulation_for(cfg.tokens_per_step, cfg.data.batch_size, cfg.data.context_length, 1)
    ckpt_path = checkpoint_to_resume(cfg.get("resume"), cfg.get("ckpt_path"))
    if ckpt_path:
        check_checkpoint_fits(ckpt_path, model)
    if cfg.get("init_from"):
        find_initial_weights(cfg.init_from)


def check_run_length(trainer: DictConfig, optimizer: dict[str, Any]) -> None:
    """Refuse runs that would never validate, or a cosine schedule with no end to decay to."""
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    endless = max_steps in (-1, None) and max_epochs in (-1, None)
    if endless and optimizer.get("schedule") == "cosine":
        raise ConfigError(
            "optimizer.schedule=cosine needs a finite run: set trainer.max_steps "
            "or trainer.max_epochs."
        )
    interval = trainer.get("val_check_interval")
    if trainer.get("limit_val_batches") == 0:
        raise ConfigError(
            "trainer.limit_val_batches=0 turns validation off, but the best checkpoint, the "
            "val curves and the sweep metric all need it: use e.g. trainer.limit_val_batches=10."
        )
    if isinstance(interval, int) and max_steps not in (-1, None) and interval > max_steps:
        raise ConfigError(
            f"trainer.val_check_interval={interval} is more than trainer.max_steps={max_steps}, "
            f"so the run would never validate: set trainer.val_check_interval={max_steps} or less."
        )


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto`: bf16 mixed precision where the GPU supports it, full fp32 elsewhere."""
    if str(precision) != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def accumulation_for(
    tokens_per_step: int, batch_size: int, context_length: int, world_size: int
) -> int:
    """Micro-batches per optimizer step so that one step sees `tokens_per_step` tokens."""
    per_micro_batch = batch_size * context_length * world_size
    if tokens_per_step < per_micro_batch or tokens_per_step % per_micro_batch:
        raise ConfigError(
            f"tokens_per_step={tokens_per_step:,} is not a multiple of data.batch_size x "
            f"model.context_length x world size = {batch_size} x {context_length} x "
            f"{world_size} = {per_micro_batch:,}: use e.g. tokens_per_step="
            f"{max(1, round(tokens_per_step / per_micro_batch)) * per_micro_batch}, or null."
        )
    return tokens_per_step // per_micro_batch


def build_trainer(cfg: DictConfig) -> L.Trainer:
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options["precision"] = resolve_precision(
        options.get("precision", "auto"), options["accelerator"]
    )
    if isinstance(options.get("strategy"), dict):
        options["strategy"] = instantiate(options["strategy"], _convert_="all")
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in cfg.get("logger", {}).values() if lg is not None]
    trainer = L.Trainer(**options, callbacks=callbacks, logger=loggers or False)
    if cfg.get("tokens_per_step"):
        if options.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError(
                "Set either tokens_per_step or trainer.accumulate_grad_batches, not both: "
                "tokens_per_step derives the accumulation."
            )
        # The world size is only known once the Trainer has resolved devices and nodes.
        trainer.accumulate_grad_batches = accumulation_for(
            cfg.tokens_per_step, cfg.data.batch_size, cfg.data.context_length, trainer.world_size
        )
    return trainer


def best_val_loss(trainer: L.Trainer) -> float:
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    return float(trainer.callback_metrics.get("val/loss", float("nan")))


def run(cfg: DictConfig) -> float:
    """Train as `cfg` says and return `cfg.optimized_metric`, which sweepers minimise.

    Leaves `<run dir>/run_summary.json` for sweep summaries, whether the run completes or fails.
    """
    run_dir = Path(cfg.paths.output_dir)
    overrides = task_overrides()
    started = time.perf_counter()
    try:
        validate(cfg)
    except ConfigError as err:
        # A resume that fails its checks leaves the run it names untouched, record included.
        if not (cfg.get("resume") or cfg.get("ckpt_path")):
            record_run(run_dir, RunRecord("failed", overrides, error=error_line(err)))
        raise
    record_run(run_dir, RunRecord(status="running", overrides=overrides))
    try:
        trainer = fit(cfg)
    except Exception as err:
        elapsed = time.perf_counter() - started
        status = "interrupted" if isinstance(err, TrainingInterrupted) else "failed"
        record = RunRecord(status, overrides, wall_time_s=elapsed, error=error_line(err))
        record_run(run_dir, record)
        raise
    best = best_val_loss(trainer)
    curves = next((c for c in trainer.callbacks if isinstance(c, TrainingCurves)), None)
    record = RunRecord(
        status="completed",
        overrides=overrides,
        best_val_loss=best,
        val_ppl=math.exp(best) if math.isfinite(best) else best,
        steps=trainer.global_step,
        tokens_seen=curves.tokens_seen if curves is not None else None,
        wall_time_s=time.perf_counter() - started,
    )
    record_run(run_dir, record)
    return OPTIMIZED_METRICS[cfg.optimized_metric](record)


def task_overrides() -> list[str]:
    """This run's command-line overrides (in a sweep: its trial's values)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def fit(cfg: DictConfig) -> L.Trainer:
    """Load the data, build the model, validate it untrained, fit, report (config validated)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = GPTDataModule(**OmegaConf.to_container(cfg.data, resolve=True))
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    ckpt_path = checkpoint_to_resume(cfg.get("resume"), cfg.get("ckpt_path"))
    if ckpt_path:
        check_checkpoint_tokenizer(ckpt_path, tokenizer)
    prompt = encode_prompt(tokenizer, cfg.prompt)
    module = GPTLightningModule(
        model=model_settings(OmegaConf.to_container(cfg.model, resolve=True), tokenizer.vocab_size),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        tokenizer=tokenizer.to_dict(),
        compile=bool(cfg.model.get("compile", False)),
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
    trainer = build_trainer(cfg)
    if not ckpt_path:
        initial = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
        log.info(
            "Initial val loss %.4f; an untrained model should be near ln(vocab_size) = %.4f",
            initial,
            math.log(tokenizer.vocab_size),
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        report(cfg, trainer, module, prompt, best_val_loss(trainer))
    return trainer


def report(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: GPTLightningModule,
    prompt: list[int],
    result: float,
) -> None:
    """What a user wants to see when a run ends: numbers, where things are, a sample."""
    device = next(module.parameters()).device
    idx = torch.tensor([prompt], device=device)
    tokens = generate(
        module.model, idx, cfg.max_new_tokens, context_length=module.config.context_length
    )
    checkpoint = trainer.checkpoint_callback
    print(f"Best val loss: {result:.4f} (perplexity {math.exp(result):.2f})")
    if checkpoint is not None:
        print(f"Best checkpoint: {checkpoint.best_model_path}")
        print(f"Last checkpoint: {checkpoint.dirpath}/last.ckpt")
    print(f"TensorBoard: tensorboard --logdir {cfg.paths.output_dir}/tensorboard")
    print(f"Greedy continuation of {cfg.prompt!r}:")
    print(module.tokenizer.decode(tokens[0].tolist()))
