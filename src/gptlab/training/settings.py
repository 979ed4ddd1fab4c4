"""A training run's settings, typed and checked once, before any data is read.

`RunSettings.from_cfg` turns Hydra's composed config into typed settings; a bad value stops
the run here with one paragraph naming the key, the value and the fix. What travels on is
typed, so nothing downstream checks a dict again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from gptlab.checks import check_count, is_count, is_number, reject_unknown
from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig, check_config
from gptlab.model.tokenizers import TOKENIZER_NAMES
from gptlab.schema import check_arguments, check_fields
from gptlab.training.module import check_compile_mode
from gptlab.training.optim import OptimizerSettings
from gptlab.training.steps import micro_batches

log = logging.getLogger(__name__)

MODEL_KEYS = {field.name for field in dataclasses.fields(GPTConfig)}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
# Lightning's older spellings of the same precisions.
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
GPU_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("auto", "cpu", *GPU_ACCELERATORS, "mps", "tpu")
# trainer.val_check_interval=auto: every AUTO_VAL_INTERVAL steps, or a twentieth of a run longer
# than twenty times that, so a long run gets 20 val points and a 1,000-step one no
# validation-bound slowdown; a shorter run validates MIN_VALIDATIONS times, enough points for a
# curve (every run also validates at step 0 and at its end).
AUTO_VAL_INTERVAL = 100
VALIDATIONS_PER_LONG_RUN = 20
MIN_VALIDATIONS = 10
# trainer.val_check_interval=auto for a run bounded by neither steps nor epochs.
ENDLESS_VAL_INTERVAL = 1000
SEED_RANGE = (0, 2**32 - 1)


@dataclasses.dataclass(frozen=True)
class ModelUse:
    """The `model` group's keys that say how a run uses the model, not what the model is
    (those are `GPTConfig`'s)."""

    tokenizer: str = "char"  # gpt2 (OpenAI's BPE) or char (the corpus's characters)
    lr: float = 4e-4  # the learning rate this model trains at; optimizer.lr follows it
    compile: bool = False  # torch.compile the forward and the loss as one graph
    compile_mode: str = "default"  # torch.compile's mode (COMPILE_MODES)
    activation_checkpointing: bool = False  # recompute block activations in the backward


RUN_MODEL_KEYS = {field.name for field in dataclasses.fields(ModelUse)}


def model_settings(model: Mapping[str, Any], vocab_size: int | None) -> dict[str, Any]:
    """GPTConfig arguments from the `model` group; a null vocab_size follows the tokenizer."""
    reject_unknown("model", model, MODEL_KEYS | RUN_MODEL_KEYS, "a model setting")
    settings = {key: value for key, value in model.items() if key not in RUN_MODEL_KEYS}
    check_fields("model", ModelUse, {k: v for k, v in model.items() if k in RUN_MODEL_KEYS})
    if model.get("lr", ModelUse.lr) <= 0:
        raise ConfigError(f"model.lr={model['lr']!r} must be positive, e.g. 4e-4.")
    check_fields("model", GPTConfig, {k: v for k, v in settings.items() if v is not None})
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = vocab_size
    return settings


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """conf/train.yaml's own top-level keys; the others are its config groups."""

    task_name: str = "train"
    seed: int = 1337  # seeds torch, numpy, Python and the data order
    ckpt_path: str | None = None  # a checkpoint to continue
    init_from: str | None = None  # other weights to start a new run from
    resume: str | None = None  # a run directory to continue
    prompt: str = "Every effort moves you"  # sampled at the end of the run
    max_new_tokens: int = 60  # tokens of that sample
    optimized_metric: Literal["val/loss", "val/ppl"] = "val/loss"  # what a sweeper minimises
    tokens_per_step: int | None = None  # tokens per optimizer step; sets the accumulation


RUN_GROUPS = ("model", "data", "trainer", "optimizer", "logger", "callbacks", "paths", "hydra")


def check_run_keys(cfg: DictConfig) -> None:
    """The top-level keys: one nothing reads (`+foo=1`) or of the wrong type is named; the
    seed and the sample's length are ranged."""
    check_fields("", RunKeys, {key: cfg[key] for key in cfg if key not in RUN_GROUPS})
    seed = cfg.get("seed", RunKeys.seed)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(
            f"seed={seed!r} must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}."
        )
    check_count("max_new_tokens", cfg.get("max_new_tokens", RunKeys.max_new_tokens), 0)


def gpu_available() -> bool:
    return torch.cuda.is_available()


def device_type_of(accelerator: str) -> str:
    """Where an accelerator setting trains: `auto` takes the GPU when there is one."""
    on_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and gpu_available())
    return "cuda" if on_gpu else "cpu"


def configure_matmul_precision(device_type: str) -> None:
    """TF32 for float32 matmuls on CUDA (bf16-mixed leaves some ops, e.g. the loss, in fp32).

    Set before the Trainer exists, which otherwise warns about unused Tensor Cores.
    """
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """`auto`: bf16 mixed precision where the GPU supports it, full fp32 elsewhere."""
    name = str(precision)
    if name == "auto":
        on_gpu = device_type_of(accelerator) == "cuda"
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    name = PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is unknown: use auto (bf16-mixed on GPUs that "
            f"support it, 32-true elsewhere) or one of {', '.join(PRECISIONS)}."
        )
    return name


def check_accelerator(accelerator: Any) -> str:
    """The accelerator named, refused up front when it is not on this machine."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} is unknown: use one of {', '.join(ACCELERATORS)}."
        )
    if accelerator in GPU_ACCELERATORS and not gpu_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no visible CUDA device"
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU, but torch "
            f"{torch.__version__} sees none ({build}): use trainer=cpu or "
            f"trainer.accelerator=auto, or run on a machine with a GPU."
        )
    return accelerator


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device(device_type_of("auto"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is unknown: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} needs a CUDA GPU, but torch {torch.__version__} sees none: use "
            f"device=cpu or device=auto."
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )
    return device


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """Lightning Trainer arguments with gptlab's meanings resolved.

    `val_every` is in optimizer steps (an int) or a fraction of an epoch (a float), whatever
    the gradient accumulation; `lightning_options` turns it into Lightning's micro-batches.
    """

    options: dict[str, Any]
    val_every: int | float
    processes_per_node: int

    @classmethod
    def from_mapping(cls, trainer: Mapping[str, Any]) -> TrainerSettings:
        options = dict(trainer)
        max_steps = options.get("max_steps", -1)
        if max_steps != -1:
            check_count("trainer.max_steps", max_steps, 1, ", or -1 to let max_epochs end the run")
        max_epochs = options.get("max_epochs")
        if max_epochs not in (None, -1):
            check_count("trainer.max_epochs", max_epochs, 1, ", or -1/null for no limit")
        for key in ("log_every_n_steps", "accumulate_grad_batches"):
            if key in options:
                check_count(f"trainer.{key}", options[key], 1)
        clip = options.get("gradient_clip_val")
        if clip is not None and (not is_number(clip) or clip < 0):
            raise ConfigError(
                f"trainer.gradient_clip_val={clip!r} must be a number > 0 (GPT-2 clips at 1.0), "
                f"or null for no clipping."
            )
        limit = options.get("limit_val_batches", 1.0)
        if limit == 0:
            raise ConfigError(
                "trainer.limit_val_batches=0 turns validation off, but the best checkpoint, the "
                "val curves and the sweep metric all need it: use e.g. "
                "trainer.limit_val_batches=10."
            )
        if not ((is_count(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)):
            raise ConfigError(
                f"trainer.limit_val_batches={limit!r} must be a number of batches (e.g. 10) or a "
                f"fraction of the val split in (0, 1] (1.0: all of it)."
            )
        if "num_sanity_val_steps" in options:
            raise ConfigError(
                "trainer.num_sanity_val_steps is set by gptlab: every new run validates its "
                "untrained model in full (step 0) and a resumed run does not. Remove the key."
            )
        check_count("trainer.num_nodes", options.get("num_nodes", 1), 1)
        accelerator = check_accelerator(options.get("accelerator", "auto"))
        options["precision"] = resolve_precision(options.get("precision", "auto"), accelerator)
        endless = is_endless(max_steps, max_epochs)
        check_arguments("trainer", L.Trainer, options)
        interval = val_interval(options.get("val_check_interval"), max_steps, endless)
        processes = count_devices(device_type_of(accelerator), options.get("devices", "auto"))
        return cls(options, interval, processes)

    @property
    def endless(self) -> bool:
        return is_endless(self.options.get("max_steps", -1), self.options.get("max_epochs"))

    @property
    def clipping(self) -> bool:
        return bool(self.options.get("gradient_clip_val"))

    @property
    def device_type(self) -> str:
        """Where the run will train, as far as the settings say before the Trainer exists."""
        return device_type_of(self.options.get("accelerator", "auto"))

    @property
    def world_size(self) -> int:
        """Processes the run trains in (devices x nodes), as Lightning will resolve them."""
        return self.processes_per_node * self.options.get("num_nodes", 1)

    def lightning_options(
        self, accumulation: int | None = None, validate_untrained: bool = True
    ) -> dict[str, Any]:
        """Trainer arguments: validations every `val_every` optimizer steps of `accumulation`
        micro-batches each (None: trainer.accumulate_grad_batches), since Lightning counts
        `val_check_interval` in micro-batches.

        `validate_untrained`: a new run validates its untrained model in full as Lightning's
        sanity check, inside `fit`, so that every strategy wraps the model once, before it.
        """
        accumulation = accumulation or self.options.get("accumulate_grad_batches", 1)
        interval = self.val_every
        if isinstance(interval, int):
            interval = micro_batches(interval, accumulation)
        return {
            **self.options,
            "accumulate_grad_batches": accumulation,
            "val_check_interval": interval,
            "num_sanity_val_steps": -1 if validate_untrained else 0,
        }


def count_devices(device_type: str, devices: Any) -> int:
    """How many processes `trainer.devices` starts on each node, resolved as Lightning does."""
    accelerator = CUDAAccelerator if device_type == "cuda" else CPUAccelerator
    try:
        if devices == "auto":
            return accelerator.auto_device_count()
        return len(accelerator.get_parallel_devices(accelerator.parse_devices(devices)))
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(
            f"trainer.devices={devices!r} does not work here: {str(err).strip()} Use auto, a "
            f"number of devices >= 1 (processes, on a CPU), or a list of GPU indices."
        ) from None


def is_endless(max_steps: int, max_epochs: int | None) -> bool:
    """Neither max_steps nor max_epochs ends the run."""
    return max_steps == -1 and max_epochs in (None, -1)


def val_interval(interval: Any, max_steps: int, endless: bool) -> int | float:
    """Optimizer steps between validations (or a fraction of an epoch); never refuses a short run.

    `auto` (or null): every 100 steps, a twentieth of a run longer than 2,000, or a tenth of
    one shorter than 1,000; once an epoch when epochs bound the run. A count longer than the
    run is cut to the run, which still validates at its end.
    """
    if interval in ("auto", None):
        if max_steps > 0:
            every = max(AUTO_VAL_INTERVAL, max_steps // VALIDATIONS_PER_LONG_RUN)
            return max(1, min(every, math.ceil(max_steps / MIN_VALIDATIONS)))
        return ENDLESS_VAL_INTERVAL if endless else 1.0
    if is_count(interval):
        if interval < 1:
            raise ConfigError(
                f"trainer.val_check_interval={interval} must be at least 1 optimizer step, a "
                f"fraction of an epoch in (0, 1], or auto."
            )
        if 0 < max_steps < interval:
            log.info(
                "trainer.val_check_interval=%d is longer than the run: validating at step %d.",
                interval,
                max_steps,
            )
            return max_steps
        return interval
    if isinstance(interval, float) and 0 < interval <= 1:
        return interval
    raise ConfigError(
        f"trainer.val_check_interval={interval!r} must be a whole number of optimizer steps "
        f"(e.g. 250), a fraction of an epoch in (0, 1] (1.0: once an epoch), or auto."
    )


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What `train.run` needs from the config, each part typed and checked."""

    model: dict[str, Any]
    tokenizer: str
    compile: bool
    compile_mode: str
    activation_checkpointing: bool
    optimizer: OptimizerSettings
    trainer: TrainerSettings
    seed: int
    # Micro-batches per optimizer step from tokens_per_step (None: trainer's own setting),
    # known once the data group's batch size and the model's context are.
    accumulation: int | None = None

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RunSettings:
        check_run_keys(cfg)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        fields = model_settings(model, vocab_size=None)
        tokenizer = model.get("tokenizer")
        if tokenizer not in TOKENIZER_NAMES:
            raise ConfigError(
                f"model.tokenizer={tokenizer!r} is unknown: use one of "
                f"{', '.join(TOKENIZER_NAMES)}."
            )
        compile_mode = check_compile_mode(model.get("compile_mode", "default"))
        compile = model.get("compile", False)
        checkpointing = model.get("activation_checkpointing", False)
        defaults = {
            field.name: field.default
            for field in dataclasses.fields(GPTConfig)
            if field.default is not dataclasses.MISSING
        }
        check_config({**defaults, **fields})
        optimizer = OptimizerSettings.from_mapping(
            OmegaConf.to_container(cfg.optimizer, resolve=True),
            tokens_per_step=cfg.get("tokens_per_step"),
        )
        trainer = TrainerSettings.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
        optimizer.check_fused(trainer.options["precision"], trainer.clipping)
        optimizer.check_muon(fields.get("arch", GPTConfig.arch), trainer.options.get("strategy"))
        if optimizer.tokens_per_step and trainer.options.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError(
                "Set either tokens_per_step or trainer.accumulate_grad_batches, not both: "
                "tokens_per_step derives the accumulation."
            )
        optimizer.check_schedule(trainer.endless)
        max_steps = trainer.options.get("max_steps", -1)
        if 0 < max_steps < optimizer.warmup_steps:
            log.warning(
                "optimizer.warmup_steps=%d is more than trainer.max_steps=%d: the learning rate "
                "never reaches optimizer.lr.",
                optimizer.warmup_steps,
                max_steps,
            )
        return cls(
            fields, tokenizer, compile, compile_mode, checkpointing, optimizer, trainer, cfg.seed
        )

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model, its vocabulary taken from the tokenizer unless the config fixes it."""
        return GPTConfig(**{**self.model, "vocab_size": self.model["vocab_size"] or vocab_size})
