"""The optimizers gptlab trains with: settings checked once, parameter groups, schedule, fusing.

AdamW (`optimizer=adamw`), or Muon for the matrices inside the transformer blocks with AdamW
for the rest (`optimizer=muon`). `OptimizerSettings` is built from the `optimizer` config group
(plus `tokens_per_step`) where the run starts and travels typed from there; the
LightningModule, the benchmark's plain loop and the checks before any data is read all use the
same object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal

import torch

from gptlab.checks import check_count, is_number, reject_unknown
from gptlab.errors import ConfigError
from gptlab.model.gpt import TransformerBlock
from gptlab.schema import check_fields

SCHEDULES = ("constant", "cosine")
# Lightning's precision whose GradScaler unscales fused AdamW's gradients inside its step.
SCALED_PRECISION = "16-mixed"
# Devices whose fused AdamW kernel `fused: auto` takes.
FUSED_DEVICES = ("cuda", "cpu")
# Strategies that shard parameters across processes (matched on the strategy's name or its
# class's, lowercased): Muon's Newton-Schulz iteration needs each matrix whole.
SHARDING_STRATEGIES = ("fsdp", "modelparallel", "deepspeed")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer, its hyperparameters, the learning-rate schedule and how many tokens
    make a step."""

    # adamw; or muon: Muon for the 2-D matrices inside the transformer blocks, and AdamW with
    # the settings below for the rest (embeddings, head, norms, biases).
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    # constant, or cosine: linear warmup, then cosine decay from lr to min_lr over the run.
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    # auto: torch's fused kernel on CUDA and CPUs where it is legal (not under 16-mixed with
    # clipping). Under muon, for the AdamW part (Muon has no fused kernel).
    fused: bool | Literal["auto"] = "auto"
    # Muon's own settings (name=muon). Its learning rate is scaled by the same schedule as lr,
    # decaying to muon_lr x min_lr / lr.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95  # Nesterov momentum
    muon_weight_decay: float = 0.0
    # torch.optim.Muon's adjust_lr_fn: original (Keller Jordan's, which muon_lr 0.02 is tuned
    # for) or match_rms_adamw (Moonshot's, for a muon_lr at AdamW's scale).
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    # Tokens per optimizer step; sets gradient accumulation. None: one micro-batch a step.
    tokens_per_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.name not in ("adamw", "muon"):
            raise ConfigError(f"optimizer.name={self.name!r} is unknown: use adamw or muon.")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            raise ConfigError(
                f"optimizer.muon_adjust_lr={self.muon_adjust_lr!r} is unknown: use original or "
                f"match_rms_adamw."
            )
        for key, example in (("lr", "4e-4"), ("muon_lr", "0.02")):
            value = getattr(self, key)
            if not is_number(value) or not value > 0:
                raise ConfigError(f"optimizer.{key}={value!r} must be positive, e.g. {example}.")
        if not (is_number(self.muon_momentum) and 0 <= self.muon_momentum < 1):
            raise ConfigError(
                f"optimizer.muon_momentum={self.muon_momentum!r} must be a number in [0, 1), "
                f"e.g. 0.95."
            )
        for key in ("weight_decay", "min_lr", "muon_weight_decay"):
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
            # On a CPU torch's own default is the per-tensor loop, three times the fused time.
            return device_type in FUSED_DEVICES and not scaled_clipping(precision, clipping)
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

    def check_muon(self, arch: str, strategy: Any) -> None:
        """Muon orthogonalises the whole matrices of the transformer blocks: a model without
        blocks has none, and a sharding strategy gives each process only a slice of them."""
        if self.name != "muon":
            return
        if arch != "gpt":
            raise ConfigError(
                f"optimizer=muon trains the matrices inside the transformer blocks, and "
                f"model.arch={arch} has none: use optimizer=adamw for it."
            )
        name = strategy_name(strategy)
        if name.lower().startswith(SHARDING_STRATEGIES):
            raise ConfigError(
                f"optimizer=muon cannot train under trainer.strategy={name}, which shards each "
                f"weight matrix across the processes (trainer=fsdp does), while Muon's "
                f"Newton-Schulz step needs every matrix whole. Use trainer=ddp, whose processes "
                f"each hold the whole model, or optimizer=adamw with trainer=fsdp."
            )


def strategy_name(strategy: Any) -> str:
    """A trainer.strategy setting by name: `ddp`, or the class a `_target_` names."""
    if isinstance(strategy, Mapping):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    return str(strategy)


def scaled_clipping(precision: str, clipping: bool) -> bool:
    """Clipping gradients that a GradScaler has scaled (16-mixed)."""
    return str(precision) == SCALED_PRECISION and clipping


def adamw_param_groups(
    params: Iterable[torch.nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, never on biases or LayerNorm gains.

    FSDP2's sharded parameters keep their full shapes, so the rule holds under FSDP too.
    """
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weight matrices inside the transformer blocks: the hidden layers Muon is for.

    The embeddings and the head are matrices too, but a lookup table and the output layer
    are not hidden layers; Keller Jordan's Muon and modded-nanogpt train them with Adam.
    """
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    found = {id(p): p for block in blocks for p in block.parameters() if p.dim() == 2}
    return list(found.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer.

    Lightning's automatic optimization steps one optimizer, and the schedule, clipping, the
    precision plugins and checkpoints read one. The two share this optimizer's param groups
    (AdamW's first, so `param_groups[0]["lr"]`, what the monitor logs, stays optimizer.lr)
    and its `state`, so `state_dict` is PyTorch's usual format holding both and a scheduler
    scales every group from its own base lr.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        self.adamw_groups = len(adamw.param_groups)
        super().__init__([*adamw.param_groups, *muon.param_groups], defaults={})
        self.share_groups_and_state()

    def share_groups_and_state(self) -> None:
        """Point both optimizers at this one's groups and state, which `load_state_dict`
        replaces with new objects."""
        split = self.adamw_groups
        self.adamw.__setstate__({"state": self.state, "param_groups": self.param_groups[:split]})
        self.muon.__setstate__({"state": self.state, "param_groups": self.param_groups[split:]})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.share_groups_and_state()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Lightning's closure (forward, backward, clipping) once, then both updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_optimizer(
    module: torch.nn.Module, settings: OptimizerSettings, fused: bool, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer `settings.name` names over `module`, and its schedule as a per-step
    scheduler (`total_steps` optimizer steps: where the cosine reaches min_lr).

    Under muon, AdamW takes what Muon does not (embeddings, head, norms, biases) with its
    decay groups, and the one schedule scales lr and muon_lr alike.
    """
    if settings.name == "adamw":
        return build_adamw(module, settings, fused, total_steps)
    matrices = muon_params(module)
    taken = {id(p) for p in matrices}
    muon = torch.optim.Muon(
        matrices,
        lr=settings.muon_lr,
        weight_decay=settings.muon_weight_decay,
        momentum=settings.muon_momentum,
        adjust_lr_fn=settings.muon_adjust_lr,
    )
    adamw = torch.optim.AdamW(
        adamw_param_groups(
            (p for p in module.parameters() if id(p) not in taken), settings.weight_decay
        ),
        lr=settings.lr,
        betas=settings.betas,
        fused=fused,
    )
    optimizer = MuonWithAdamW(muon, adamw)
    return optimizer, per_step_schedule(optimizer, settings, total_steps)


def build_adamw(
    module: torch.nn.Module, settings: OptimizerSettings, fused: bool, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `module` with its decay groups, and its schedule as a per-step scheduler."""
    optimizer = torch.optim.AdamW(
        adamw_param_groups(module.parameters(), settings.weight_decay),
        lr=settings.lr,
        betas=settings.betas,
        fused=fused,
    )
    return optimizer, per_step_schedule(optimizer, settings, total_steps)


def per_step_schedule(
    optimizer: torch.optim.Optimizer, settings: OptimizerSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, stepped once per optimizer step, scaling each param group from its own
    base lr (`total_steps`: where the cosine reaches min_lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(settings.lr_multiplier, total_steps=total_steps)
    )
