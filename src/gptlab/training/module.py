"""The LightningModule: next-token cross-entropy, perplexity, the optimizer, clipping, compile."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig, build_model
from gptlab.model.tokenizers import Tokenizer, tokenizer_from_dict
from gptlab.training.optim import OptimizerSettings, build_optimizer
from gptlab.training.sharding import global_norm, is_sharded, shard_model

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def model_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward and loss in one function, so `torch.compile` makes one graph of both: the fp32
    upcast of the logits then fuses into the cross-entropy instead of being materialised."""
    return next_token_loss(model(inputs), targets)


def check_compile_mode(compile_mode: Any) -> str:
    """torch.compile's modes; checked before a run, not at its first compiled step."""
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile_mode={compile_mode!r} is unknown: use one of "
            f"{', '.join(COMPILE_MODES)}."
        )
    return compile_mode


def gradient_norm(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipping to `max_norm` (inf: measure only), without a host sync.

    Under FSDP each rank holds a shard of every gradient: the norm of the shards is reduced
    over the ranks before any clipping, so every rank clips by the same, true global norm.
    """
    params = [p for p in module.parameters() if p.grad is not None]
    norm = global_norm(torch.nn.utils.get_total_norm([p.grad for p in params]))
    if not math.isinf(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class GPTLightningModule(L.LightningModule):
    """Wraps a GPTModel; its hyperparameters alone rebuild the model and tokenizer."""

    def __init__(
        self,
        model: GPTConfig | Mapping[str, Any],
        optimizer: OptimizerSettings | Mapping[str, Any],
        tokenizer: dict,
        compile: bool = False,
        compile_mode: str = "default",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = model if isinstance(model, GPTConfig) else GPTConfig(**model)
        self.optimizer_settings = OptimizerSettings.of(optimizer)
        check_compile_mode(compile_mode)
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "model": self.config.to_dict(),
                "optimizer": self.optimizer_settings.to_dict(),
                "tokenizer": tokenizer,
                "compile": compile,
                "compile_mode": compile_mode,
                "activation_checkpointing": activation_checkpointing,
            }
        )
        self.tokenizer = tokenizer_from_dict(tokenizer)
        check_vocab_size(self.config.vocab_size, self.tokenizer)
        self.model = build_model(self.config)
        self.model.checkpoint_activations = activation_checkpointing
        # The model is passed in, not compiled itself, so state_dict keys keep no `_orig_mod.`
        # and checkpoints load into uncompiled models; generation stays eager.
        self.loss_of = torch.compile(model_loss, mode=compile_mode) if compile else model_loss
        # The last training micro-batch's loss and the last step's gradient norm, as device
        # tensors: callbacks read them when they log, so no step waits for the GPU.
        self.last_loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        self._val_totals: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        inputs, targets = batch
        loss = self.loss_of(self.model, inputs, targets)
        self.last_loss = loss.detach()
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        loss = self.loss_of(self.model, inputs, targets)
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
        # Loggers take a metric named "step" as the x value: the optimizer steps taken, the
        # number that checkpoint names and the Text tab show too (Lightning would say one less).
        self.log("step", float(self.trainer.global_step))
        if self.trainer.sanity_checking:
            self.log_untrained(float(loss))

    def log_untrained(self, loss: float) -> None:
        """The untrained model's validation, which gptlab runs as Lightning's sanity check so
        that every strategy has wrapped the model before it. Lightning sends no sanity-check
        metric to the loggers, so step 0 is written to them here."""
        for logger in self.loggers:
            logger.log_metrics({"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}, step=0)
        if self.trainer.is_global_zero:
            log.info(
                "Initial val loss %.4f; an untrained model should be near ln(vocab_size) = %.4f",
                loss,
                math.log(self.config.vocab_size),
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm here rather than in Lightning's precision plugin.

        The plugin refuses fused AdamW under any mixed precision, bf16 included, where no
        gradient is scaled; and under FSDP it cannot clip by norm at all. Under 16-mixed
        the gradients reaching this hook are unscaled unless AdamW is fused, which
        `OptimizerSettings.check_fused` rules out with clipping.
        """
        if gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        max_norm = float(gradient_clip_val) if gradient_clip_val else math.inf
        self.grad_norm = gradient_norm(self, max_norm).detach()

    def configure_model(self) -> None:
        """Under `trainer=fsdp` Lightning hands the module a device mesh: shard with FSDP2,
        gathering in bf16 under bf16-mixed. Called again by a later validate or test."""
        if self.device_mesh is None or is_sharded(self.model):
            return
        bf16 = str(self.trainer.precision).startswith("bf16")
        shard_model(self.model, self.device_mesh["data_parallel"], torch.bfloat16 if bf16 else None)

    def configure_optimizers(self):
        settings = self.optimizer_settings
        fused = settings.use_fused(
            self.device.type, self.trainer.precision, bool(self.trainer.gradient_clip_val)
        )
        total_steps = settings.schedule_length(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self, settings, fused, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }
