"""AdamW as gptlab trains with it: settings checked once, parameter groups, schedule, fusing.

`OptimizerSettings` is built from the `optimizer` config group (plus `tokens_per_step`) where
the run starts and travels typed from there; the LightningModule, the benchmark's plain loop
and the checks before any data is read all use the same object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch

from gptlab.checks import check_count, is_number, reject_unknown
from gptlab.errors import ConfigError
from gptlab.schema import check_fields

SCHEDULES = ("constant", "cosine")
# Lightning's precision whose GradScaler unscales fused AdamW's gradients inside its step.
SCALED_PRECISION = "16-mixed"


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's hyperparameters, its learning-rate schedule and how many tokens make a step."""

    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    # constant, or cosine: linear warmup, then cosine decay from lr to min_lr over the run.
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    # auto: the fused CUDA kernel where it is legal (not under 16-mixed with clipping).
    fused: bool | Literal["auto"] = "auto"
    # Tokens per optimizer step; sets gradient accumulation. None: one micro-batch a step.
    tokens_per_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if not is_number(self.lr) or not self.lr > 0:
            raise ConfigError(f"optimizer.lr={self.lr!r} must be positive, e.g. 4e-4.")
        for key in ("weight_decay", "min_lr"):
            value = getattr(self, key)
            if not is_number(value) or value < 0:
                raise ConfigError(f"optimizer.{key}={value!r} must be a number >= 0.")
        check_count("optimizer.warmup_steps", self.warmup_steps, 0)
        if len(self.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(
                f"optimizer.betas={list(self.betas)!r} must be two numbers in [0, 1), "
                f"e.g. [0.9, 0.95]."
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"optimizer.schedule={self.schedule!r} is unknown: use {' or '.join(SCHEDULES)}."
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.min_lr!r} must be between 0 and optimizer.lr={self.lr}."
            )
        if not (self.fused == "auto" or isinstance(self.fused, bool)):
            raise ConfigError(
                f"optimizer.fused={self.fused!r} is unknown: use auto, true or false."
            )
        if self.tokens_per_step is not None:
            check_count(
                "tokens_per_step",
                self.tokens_per_step,
                1,
                " (tokens per optimizer step, e.g. 524288 as GPT-2), or null for one micro-batch",
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **extra: Any) -> OptimizerSettings:
        """From the `optimizer` group; a key that is not a setting is named, not ignored.

        `extra`: settings from outside the group (tokens_per_step), which it may not set.
        """
        known = {field.name for field in dataclasses.fields(cls)} - set(extra)
        reject_unknown("optimizer", values, known, "an optimizer setting")
        check_fields("optimizer", cls, values)
        return cls(**{**values, **extra})

    @classmethod
    def of(cls, settings: OptimizerSettings | Mapping[str, Any]) -> OptimizerSettings:
        """Settings as given, or rebuilt from the dict a checkpoint stores."""
        return settings if isinstance(settings, cls) else cls.from_mapping(settings)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with `torch.load(weights_only=True)`."""
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    def lr_multiplier(self, step: int, total_steps: int) -> float:
        """Linear warmup to 1, then (cosine) decay to min_lr / lr at `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        floor = self.min_lr / self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def schedule_length(self, steps: float) -> int:
        """Optimizer steps the schedule spans: a cosine needs a run with an end to decay to."""
        if self.schedule == "constant":
            return 0
        self.check_schedule(endless=not math.isfinite(steps) or steps < 1)
        return int(steps)

    def check_schedule(self, endless: bool) -> None:
        """A cosine decays over the run, so the run must have an end."""
        if self.schedule == "cosine" and endless:
            raise ConfigError(
                "optimizer.schedule=cosine needs a finite run: set trainer.max_steps "
                "or trainer.max_epochs."
            )

    def accumulation(self, batch_size: int, context_length: int, world_size: int) -> int | None:
        """Micro-batches per optimizer step so that one step sees `tokens_per_step` tokens
        (None without tokens_per_step: the Trainer's own setting stands)."""
        if self.tokens_per_step is None:
            return None
        per_micro_batch = batch_size * context_length * world_size
        if self.tokens_per_step < per_micro_batch or self.tokens_per_step % per_micro_batch:
            suggestion = max(1, round(self.tokens_per_step / per_micro_batch)) * per_micro_batch
            raise ConfigError(
                f"tokens_per_step={self.tokens_per_step:,} is not a multiple of data.batch_size "
                f"x model.context_length x world size = {batch_size} x {context_length} x "
                f"{world_size} = {per_micro_batch:,}: use e.g. tokens_per_step={suggestion}, "
                f"or null."
            )
        return self.tokens_per_step // per_micro_batch

    def use_fused(self, device_type: str, precision: str, clipping: bool) -> bool:
        """Whether AdamW runs as one fused kernel (`check_fused` has refused what cannot)."""
        if self.fused == "auto":
            return device_type == "cuda" and not scaled_clipping(precision, clipping)
        return bool(self.fused)

    def check_fused(self, precision: str, clipping: bool) -> None:
        """Under 16-mixed a GradScaler scales the loss, and a fused AdamW unscales the
        gradients inside its own step, after clipping would have seen them still scaled."""
        if self.fused is True and scaled_clipping(precision, clipping):
            raise ConfigError(
                "optimizer.fused=true cannot be combined with trainer.precision=16-mixed and "
                "gradient clipping: fused AdamW unscales the gradients inside its step, after "
                "clipping saw them scaled. Use optimizer.fused=auto, bf16-mixed, or "
                "trainer.gradient_clip_val=null."
            )


def scaled_clipping(precision: str, clipping: bool) -> bool:
    """Clipping gradients that a GradScaler has scaled (16-mixed)."""
    return str(precision) == SCALED_PRECISION and clipping


def adamw_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, never on biases or LayerNorm gains.

    FSDP2's sharded parameters keep their full shapes, so the rule holds under FSDP too.
    """
    params = list(module.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_adamw(
    module: torch.nn.Module, settings: OptimizerSettings, fused: bool, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `module` with its decay groups, and its schedule as a per-step scheduler
    (`total_steps` optimizer steps: where the cosine reaches min_lr)."""
    optimizer = torch.optim.AdamW(
        adamw_param_groups(module, settings.weight_decay),
        lr=settings.lr,
        betas=settings.betas,
        fused=fused,
    )
    schedule = partial(settings.lr_multiplier, total_steps=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
