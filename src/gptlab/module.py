"""The LightningModule: next-token cross-entropy, perplexity, AdamW and its schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from gptlab.errors import ConfigError
from gptlab.flops import training_flops_per_batch
from gptlab.model import GPTConfig, build_model
from gptlab.tokenizers import Tokenizer, tokenizer_from_dict


def check_vocab_size(vocab_size: int, tokenizer: Tokenizer) -> None:
    """The embedding rows must be the tokenizer's ids, or tokens would read other rows."""
    if vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} does not match the {tokenizer.name} tokenizer's "
            f"{tokenizer.vocab_size} tokens: set model.vocab_size={tokenizer.vocab_size}, or "
            f"null to follow the tokenizer."
        )


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every window (the seed's flattened form)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def writes_step_metrics(trainer: L.Trainer) -> bool:
    """Whether the loggers write this training step's metrics (every `log_every_n_steps`).

    Lightning drops step values logged on the other steps, yet each `self.log` call still
    costs about 0.3 ms on a CPU, a quarter of a small model's step for three calls.
    """
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer(optimizer: dict[str, Any]) -> None:
    lr = optimizer["lr"]
    if not is_number(lr) or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r} must be positive, e.g. 4e-4.")
    for key in ("weight_decay", "warmup_steps", "min_lr"):
        value = optimizer.get(key, 0)
        if not is_number(value) or value < 0:
            raise ConfigError(f"optimizer.{key}={value!r} must be a number >= 0.")
    betas = optimizer.get("betas", (0.9, 0.999))
    if len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(
            f"optimizer.betas={list(betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]."
        )
    schedule = optimizer.get("schedule", "constant")
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"optimizer.schedule={schedule!r} is unknown: use constant or cosine.")
    min_lr = optimizer.get("min_lr", 0.0)
    if not 0 <= min_lr <= lr:
        raise ConfigError(f"optimizer.min_lr={min_lr!r} must be between 0 and optimizer.lr={lr}.")


FSDP_PREFIX = "_fsdp_wrapped_module."


def adamw_param_groups(
    module: torch.nn.Module, matrix_names: set[str], weight_decay: float
) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, never on biases or LayerNorm gains.

    `matrix_names` are the >= 2-D parameters of the unwrapped module: FSDP flattens its
    shards to 1-D, so shapes seen here cannot decide.
    """
    named = [(name.replace(FSDP_PREFIX, ""), p) for name, p in module.named_parameters()]
    return [
        {"params": [p for name, p in named if name in matrix_names], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in matrix_names], "weight_decay": 0.0},
    ]


class GPTLightningModule(L.LightningModule):
    """Wraps a GPTModel; its hyperparameters alone rebuild the model and tokenizer."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        tokenizer: dict,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optimizer(optimizer)
        self.config = GPTConfig(**model)
        self.tokenizer = tokenizer_from_dict(tokenizer)
        check_vocab_size(self.config.vocab_size, self.tokenizer)
        self.model = build_model(self.config)
        self.matrix_names = {name for name, p in self.named_parameters() if p.dim() >= 2}
        # Compile the inner forward, not the module, so state_dict keys keep no `_orig_mod.`
        # and checkpoints load into uncompiled models; generation stays eager.
        self.compiled_forward = torch.compile(self.model.forward) if compile else None
        # Read by ThroughputMonitor after each batch to report FLOPs/s and MFU.
        self.flops_per_batch: int | None = None
        self._val_totals: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The training and validation forward: compiled when `compile` is on."""
        return self.model(idx) if self.compiled_forward is None else self.compiled_forward(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        inputs, targets = batch
        if self.flops_per_batch is None:
            self.flops_per_batch = training_flops_per_batch(self.config, *inputs.shape)
        loss = next_token_loss(self.logits(inputs), targets)
        if writes_step_metrics(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/ppl", loss.detach().exp())
            # Both AdamW groups share one schedule, so one "lr" curve; Lightning's
            # LearningRateMonitor would log it twice, as lr/pg1 and lr/pg2.
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        loss = next_token_loss(self.logits(inputs), targets)
        n_targets = torch.tensor(targets.numel(), device=loss.device, dtype=torch.float64)
        self._val_totals.append(torch.stack([loss.detach().double() * n_targets, n_targets]))

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over every batch and every rank; the perplexity is exp of that
        # mean, not a mean of per-batch perplexities.
        totals = torch.stack(self._val_totals).sum(dim=0)
        self._val_totals.clear()
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss = (totals[0] / totals[1]).float()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())

    def configure_optimizers(self):
        opt = self.hparams.optimizer
        optimizer = torch.optim.AdamW(
            adamw_param_groups(self, self.matrix_names, opt.get("weight_decay", 0.0)),
            lr=opt["lr"],
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            # One kernel for all parameters instead of a loop of small ones.
            fused=self.device.type == "cuda",
        )
        cosine = opt.get("schedule", "constant") == "cosine"
        total_steps = self.trainer.estimated_stepping_batches if cosine else 0
        if not math.isfinite(total_steps):
            raise ConfigError(
                "optimizer.schedule=cosine needs a finite run: set trainer.max_steps "
                "or trainer.max_epochs."
            )
        schedule = partial(
            lr_multiplier,
            warmup_steps=opt.get("warmup_steps", 0),
            total_steps=int(total_steps),
            min_lr_ratio=opt.get("min_lr", 0.0) / opt["lr"] if cosine else 1.0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }
