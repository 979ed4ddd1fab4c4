"""What a run shows while it trains: scalars, samples, hyperparameters and the loss plot.

Every value here that lives on the accelerator is read only on the steps the loggers write
(`trainer.log_every_n_steps`), the last step and a step an interrupt stops at, so the GPU is
never waited on in between.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch.utils.tensorboard.summary import hparams

from gptlab.errors import TrainingInterrupted
from gptlab.inference.generation import check_sampling, continue_prompt, encode_prompt
from gptlab.jobs import swept_hparams
from gptlab.model.gpt import build_model, count_parameters
from gptlab.training.flops import peak_flops, training_flops_per_batch
from gptlab.training.loggers import flat_hparams
from gptlab.training.plots import plot_losses
from gptlab.training.sharding import is_sharded, whole_state_dict
from gptlab.training.steps import is_final_step, optimizer_stepped

log = logging.getLogger(__name__)

# The dtype whose peak FLOP/s an MFU is measured against, by Lightning precision.
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}
# Loggers with a place for text, where the samples go (CSVLogger has none).
TEXT_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger)
# The HParams columns of a run outside a sweep (a sweep's are the keys it varies, then the
# parameter count): the model's size and the settings most often changed between runs, few
# enough for TensorBoard's table, which shows its first five columns until more are ticked.
RUN_COLUMNS = ("n_parameters", "optimizer/lr", "data/batch_size", "trainer/max_steps")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a Lightning precision run in."""
    return COMPUTE_DTYPES.get(str(precision).split("-")[0], torch.float32)


def synchronized_clock(device: torch.device) -> float:
    """Seconds, once `device` has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def tensorboard_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class TrainingMonitor(Callback):
    """Train metrics, throughput, tokens seen and the loss curves of a run.

    On each written step it logs `train/loss` (the mean over the step's micro-batches, on
    every rank),
    `train/ppl`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec` (since the last written
    step, validation excluded), `train/mfu` where the device's peak is known, and
    `train/tokens_seen`, and shows loss, lr and tokens/s in the progress bar. The curves
    travel in checkpoints, so a resumed run plots its whole history in `loss.png`. At the end
    it prints the run's tokens/s and MFU, timed from the end of the first optimizer step
    (compilation and allocation) unless the run has only that one.
    """

    def __init__(self, plot_path: str | None = None) -> None:
        self.plot_path = plot_path
        self.tokens_seen = 0
        # (tokens seen, optimizer step, loss) triples.
        self.train_losses: list[tuple[int, int, float]] = []
        self.val_losses: list[tuple[int, int, float]] = []
        self.run_tokens_per_sec: float | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._unwritten_step: int | None = None
        self._window_start: float | None = None
        self._window_tokens = 0
        self._window_steps = 0
        self._paused_at: float | None = None
        self._timed = [0.0, 0, 0]  # seconds, tokens, steps after the first step
        self._first = [0.0, 0, 0]  # the same for the first step alone
        self._flops_per_token: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start = synchronized_clock(trainer.strategy.root_device)
        self._timed, self._first = [0.0, 0, 0], [0.0, 0, 0]

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        if self._flops_per_token is None:
            flops = training_flops_per_batch(pl_module.config, *batch[0].shape)
            self._flops_per_token = flops / batch[0].numel()
        # A copy: under CUDA graphs (compile_mode=reduce-overhead) the step's loss lives in a
        # buffer that the next step's replay overwrites.
        loss = pl_module.last_loss
        self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss
        self._micro_batches += 1
        if not optimizer_stepped(trainer, batch_idx):
            return
        self._window_steps += 1
        step = trainer.global_step
        if not self._first[2]:
            # The first step compiles and allocates: timed on its own, kept out of the rate.
            self._close_window(trainer, self._first)
        if step % trainer.log_every_n_steps == 0 or is_final_step(trainer):
            self.write(trainer, pl_module)
        else:
            self._unwritten_step = step

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, to_bar: bool = True) -> None:
        """Log the steps since the last write, at the optimizer step just taken (and show them
        in the progress bar, except where Lightning allows no logging: after an exception)."""
        step = trainer.global_step
        # The mean over every rank's micro-batches: the loss of the whole global batch.
        mean = trainer.strategy.reduce(self._loss_sum / self._micro_batches, reduce_op="mean")
        loss = float(mean)
        seconds, tokens, _ = self._close_window(trainer, self._timed)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        metrics = {
            "train/loss": loss,
            "train/ppl": math.exp(min(loss, 700.0)),
            "train/lr": lr,
            "train/tokens_seen": float(self.tokens_seen),
        }
        if pl_module.grad_norm is not None:
            metrics["train/grad_norm"] = float(pl_module.grad_norm)
        if seconds > 0:
            metrics["train/tokens_per_sec"] = tokens / seconds
            mfu = self.mfu(trainer, tokens / seconds)
            if mfu is not None:
                metrics["train/mfu"] = mfu
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        bar = {"loss": loss, "lr": lr, "tok/s": metrics.get("train/tokens_per_sec", 0.0)}
        for name, value in bar.items() if to_bar else ():
            pl_module.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.train_losses.append((self.tokens_seen, step, loss))
        self._loss_sum, self._micro_batches, self._unwritten_step = None, 0, None

    def _close_window(self, trainer: L.Trainer, totals: list) -> tuple[float, int, int]:
        """End the timing window at this step, add it to `totals`, start the next one."""
        now = synchronized_clock(trainer.strategy.root_device)
        window = (now - self._window_start, self._window_tokens, self._window_steps)
        for i, value in enumerate(window):
            totals[i] += value
        self._window_start, self._window_tokens, self._window_steps = now, 0, 0
        return window

    def mfu(self, trainer: L.Trainer, tokens_per_sec: float) -> float | None:
        """Model FLOPs utilisation per device; None where no peak is known (CPUs)."""
        peak = peak_flops(trainer.strategy.root_device, compute_dtype(trainer.precision))
        if not peak or not self._flops_per_token:
            return None
        return self._flops_per_token * tokens_per_sec / trainer.world_size / peak

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._paused_at = synchronized_clock(trainer.strategy.root_device)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None and self._window_start is not None:
            self._window_start += synchronized_clock(trainer.strategy.root_device) - self._paused_at
        self._paused_at = None
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val_losses.append((self.tokens_seen, trainer.global_step, float(loss)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds, tokens, steps = self._timed if self._timed[2] else self._first
        if not steps or seconds <= 0:
            return
        self.run_tokens_per_sec = tokens / seconds
        message = (
            f"Throughput: {self.run_tokens_per_sec:,.0f} tokens/s, {1000 * seconds / steps:.1f} "
            f"ms/step over {steps} step{'s' if steps > 1 else ''} on {trainer.world_size} x "
            f"{trainer.strategy.root_device.type}"
        )
        mfu = self.mfu(trainer, self.run_tokens_per_sec)
        if mfu is not None:
            message += f", MFU {mfu:.1%}"
        if trainer.is_global_zero:
            print(message)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plot(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # The step an interrupt stopped at belongs on the curves, as a finished run's last does.
        if isinstance(exception, TrainingInterrupted) and self._unwritten_step == (
            trainer.global_step
        ):
            self.write(trainer, pl_module, to_bar=False)
        self.plot(trainer)

    def plot(self, trainer: L.Trainer) -> None:
        if self.plot_path and trainer.is_global_zero and (self.train_losses or self.val_losses):
            plot_losses(self.train_losses, self.val_losses, Path(self.plot_path))

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = state_dict["tokens_seen"]
        self.train_losses = [tuple(x) for x in state_dict["train_losses"]]
        self.val_losses = [tuple(x) for x in state_dict["val_losses"]]


def inference_model(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.nn.Module | None:
    """The model to sample from: the training one, or on rank 0 a whole copy under FSDP.

    FSDP shards the parameters, so its model is only whole inside its own forward. Gathering
    the whole weights is collective, so every rank calls this; only rank 0 gets a model.
    """
    if not is_sharded(pl_module.model):
        return pl_module.model
    state = whole_state_dict(pl_module.model)
    if not trainer.is_global_zero:
        return None
    model = build_model(pl_module.config)
    model.load_state_dict(state)
    return model.to(trainer.strategy.root_device)


class SampleText(Callback):
    """At each validation, sample a continuation of a fixed prompt into each logger with a place
    for text: TensorBoard's Text tab, a W&B table, MLflow artifacts `sample/step_<n>.md`.

    The sampling seed is fixed, so differences between steps come from the model alone.
    """

    def __init__(
        self,
        prompt: str,
        max_new_tokens: int = 60,
        temperature: float = 1.0,
        top_k: int | None = 40,
        seed: int = 0,
    ) -> None:
        check_sampling(temperature, top_k, None, max_new_tokens, prefix="callbacks.sample_text.")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TEXT_LOGGERS)]
        if not loggers:
            return
        model = inference_model(trainer, pl_module)
        if model is None:
            return
        text = self.sample(model, pl_module)
        for logger in loggers:
            log_text(logger, "sample", text, trainer.global_step)

    def sample(self, model: torch.nn.Module, pl_module: L.LightningModule) -> str:
        """Markdown: the settings, then prompt and continuation as an indented (verbatim) block."""
        tokenizer = pl_module.tokenizer
        prompt = encode_prompt(tokenizer, self.prompt)
        tokens = continue_prompt(
            model,
            prompt,
            self.max_new_tokens,
            context_length=pl_module.config.context_length,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
        )
        continuation = tokenizer.decode(tokens[len(prompt) :])
        verbatim = "\n".join("    " + line for line in (self.prompt + continuation).splitlines())
        return (
            f"Prompt {self.prompt!r}, temperature {self.temperature}, top-k {self.top_k}, "
            f"seed {self.seed}:\n\n{verbatim}"
        )


class HParamsSummary(Callback):
    """The run's key settings, parameter count and swept values as hyperparameters of every
    logger, and TensorBoard's HParams tab.

    Logged when fit starts, so they reach the hyperparameter file each logger writes then
    (TensorBoard's and CSV's hparams.yaml). The tab's columns are what tells runs apart: a
    sweep's swept keys first, then the parameter count, or `columns` outside a sweep; the
    settings every run shares stay out of the table, in those files. Then come the metrics,
    whose values the tab reads from their scalar curves (the latest point), so no
    `hp_metric = -1` appears. It also lays out a Custom Scalars chart of train and val loss
    together, which reads right even where smoothing bends a curve of few val points.
    """

    def __init__(
        self,
        config: dict[str, Any],
        metrics: Sequence[str] = ("val/loss", "val/ppl"),
        columns: Sequence[str] = RUN_COLUMNS,
    ) -> None:
        self.config = config
        self.metrics = list(metrics)
        self.columns = list(columns)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return  # other ranks' loggers are dummies
        swept = swept_hparams()
        params = {**self.config, "n_parameters": count_parameters(pl_module.model)}
        params = {**flat_hparams(params), **swept}
        # Lightning gives every logger the module's own hyperparameters (model/..., optimizer/...)
        # right after this hook; MLflow refuses a second value for a name, so those are left out.
        given = flat_hparams(dict(pl_module.hparams_initial))
        for logger in trainer.loggers:
            logger.log_hyperparams({k: v for k, v in params.items() if k not in given})
        columns = [*swept, "n_parameters"] if swept else self.columns
        table = {name: params[name] for name in columns if params.get(name) is not None}
        # The summaries name the metrics without logging them, as Lightning's
        # log_hyperparams(metrics=) would: that gave val/loss a second point at step 0.
        summaries = hparams(table, dict.fromkeys(self.metrics))
        for logger in tensorboard_loggers(trainer):
            writer = logger.experiment
            for summary in summaries:
                writer.file_writer.add_summary(summary, trainer.global_step)
            writer.add_custom_scalars(
                {"loss": {"train and val": ["Multiline", ["train/loss", "val/loss"]]}}
            )


def log_text(logger: Logger, key: str, text: str, step: int) -> None:
    """`text` into the logger's own place for text, labelled with the optimizer step."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, text, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_text(key, columns=["step", "text"], data=[[step, text]], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"{key}/step_{step:06d}.md")
