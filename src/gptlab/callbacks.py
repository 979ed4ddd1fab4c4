"""Trainer callbacks and the small functions their configs point at."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

# The dtype Lightning's own ThroughputMonitor uses to look up the device's peak.
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

from gptlab.errors import NonFiniteLossError, TrainingInterrupted
from gptlab.generation import check_sampling, encode_prompt, generate
from gptlab.model import count_parameters
from gptlab.module import writes_step_metrics

log = logging.getLogger(__name__)


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Samples in a batch, for ThroughputMonitor's `batch_size_fn`."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input tokens in a batch, for ThroughputMonitor's `length_fn`: items/s are tokens/s."""
    return batch[0].numel()


def tensorboard_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def optimizer_stepped(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended completed an optimizer step (the last one accumulated)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or (
        batch_idx + 1 == trainer.num_training_batches
    )


class TrainingCurves(Callback):
    """Counts training tokens, logs them as `train/tokens_seen`, and plots `loss.png` at the end.

    Keeps the train loss of every logged step and the val loss of every validation against
    tokens seen and optimizer steps; checkpoints carry them, so a resumed run plots its whole
    history.
    """

    def __init__(self, plot_path: str | None = None) -> None:
        self.plot_path = plot_path
        self.tokens_seen = 0
        # (tokens seen, optimizer step, loss) triples.
        self.train_losses: list[tuple[int, int, float]] = []
        self.val_losses: list[tuple[int, int, float]] = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        self.tokens_seen += tokens_in_batch(batch) * trainer.world_size
        # On the steps the loggers write, as train/loss, once the step is taken (not at each
        # accumulated batch): reading the loss on the others would also make the CPU wait for
        # the GPU.
        if not (optimizer_stepped(trainer, batch_idx) and writes_step_metrics(trainer)):
            return
        pl_module.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_losses.append((self.tokens_seen, trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None:
            self.val_losses.append((self.tokens_seen, trainer.global_step, float(loss)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plot(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
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


def plot_losses(
    train_losses: Sequence[tuple[int, int, float]],
    val_losses: Sequence[tuple[int, int, float]],
    path: Path,
) -> None:
    """Train and val loss against tokens seen, steps on the top axis: the book's plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for points, label, style in (
        (train_losses, "Training loss", {"linestyle": "-"}),
        (val_losses, "Validation loss", {"linestyle": "-.", "marker": "o"}),
    ):
        if points:
            tokens, _, losses = zip(*points, strict=True)
            ax.plot(tokens, losses, label=label, **style)
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    # Steps as a function of tokens seen, read off the recorded pairs (exact even when the
    # tokens per step changed on resume).
    pairs = sorted({(0, 0), *((t, s) for t, s, _ in (*train_losses, *val_losses))})
    tokens, steps = (np.array(x, dtype=float) for x in zip(*pairs, strict=True))
    if tokens[-1] > 0:
        top = ax.secondary_xaxis(
            "top",
            functions=(
                lambda t: np.interp(t, tokens, steps),
                lambda s: np.interp(s, steps, tokens),
            ),
        )
        top.set_xlabel("Steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


class SampleText(Callback):
    """At each validation, sample a continuation of a fixed prompt into TensorBoard's Text tab.

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
        check_sampling(temperature, top_k, None)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = tensorboard_loggers(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not loggers:
            return
        text = self.sample(pl_module)
        for logger in loggers:
            logger.experiment.add_text("sample", text, global_step=trainer.global_step)

    def sample(self, pl_module: L.LightningModule) -> str:
        """Markdown: the settings, then prompt and continuation as an indented (verbatim) block."""
        tokenizer = pl_module.tokenizer
        prompt = encode_prompt(tokenizer, self.prompt)
        device = pl_module.device
        tokens = generate(
            pl_module.model,
            torch.tensor([prompt], device=device),
            self.max_new_tokens,
            context_length=pl_module.config.context_length,
            temperature=self.temperature,
            top_k=self.top_k,
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )
        continuation = tokenizer.decode(tokens[0, len(prompt) :].tolist())
        verbatim = "\n".join("    " + line for line in (self.prompt + continuation).splitlines())
        return (
            f"Prompt {self.prompt!r}, temperature {self.temperature}, top-k {self.top_k}, "
            f"seed {self.seed}:\n\n{verbatim}"
        )


class HParamsSummary(Callback):
    """Fills TensorBoard's HParams tab: the run's settings, parameter count and val metrics.

    Logged once, at the first validation (step 0 for a fresh run, the untrained model), with
    real metric values, so `hp_metric = -1` never appears. The tab then shows the latest value
    of each metric's scalar curve.
    """

    def __init__(
        self, config: dict[str, Any], metrics: Sequence[str] = ("val/loss", "val/ppl")
    ) -> None:
        self.config = config
        self.metrics = list(metrics)
        self.logged = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.logged:
            return
        available = trainer.callback_metrics
        metrics = {name: float(available[name]) for name in self.metrics if name in available}
        params = {**self.config, "n_parameters": count_parameters(pl_module.model)}
        self.logged = True
        if not trainer.is_global_zero or not metrics:
            return  # other ranks' loggers are dummies
        # The tab reads each metric's values from its scalar curve, so the summaries name the
        # metrics without logging them again, as Lightning's log_hyperparams(metrics=) would:
        # that gave val/loss a second point at step 0.
        summaries = hparams(flat_hparams(params), metrics)
        for logger in tensorboard_loggers(trainer):
            logger.log_hyperparams(params)  # for hparams.yaml; no scalars without metrics=
            writer = logger.experiment._get_file_writer()  # as log_hyperparams reaches it
            for summary in summaries:
                writer.add_summary(summary, trainer.global_step)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as the HParams tab takes them: `model/emb_dim` keys, scalar values."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


class RandomStateCheckpoint(Callback):
    """Keeps the global RNG states in checkpoints, so dropout continues exactly on resume.

    Lightning restores weights, optimizer, schedule and loop progress, but not RNG states.
    Stored as tensors, ints and lists so that `torch.load(weights_only=True)` reads them.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state(
            (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
        )
        random.setstate(state_dict["python"])


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ModelCheckpoint keeps `last.ckpt` (the run's checkpoints folder without one)."""
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.dirpath:
            name = checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION
            return Path(checkpoint.dirpath) / name
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def saved_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


class NonFiniteLossGuard(Callback):
    """Stops training at the first nan/inf loss, before its gradients reach the weights.

    The check runs before backward, so the optimizer never steps on a non-finite loss; as a
    second line, no checkpoint with non-finite weights is ever written, so the last good
    `last.ckpt` survives.
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).item())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        last = last_checkpoint_path(trainer)
        step = saved_step(last)
        kept = (
            f"The last good checkpoint, {last} (step {step}), is kept"
            if step is not None
            else "No checkpoint had been saved yet"
        )
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else "?"
        raise NonFiniteLossError(
            f"Training stopped at step {trainer.global_step + 1}: the loss is {loss.item()} "
            f"(not finite), so that step was not applied. {kept}. The learning rate was {lr}: "
            f"start again with a lower optimizer.lr, more optimizer.warmup_steps, or a "
            f"lower trainer.gradient_clip_val."
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for name, parameter in pl_module.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"Not saving a checkpoint at step {trainer.global_step}: parameter {name} "
                    f"holds nan or inf, so the last good checkpoint is kept. Start again with a "
                    f"lower optimizer.lr or trainer.gradient_clip_val."
                )


class GracefulInterrupt(Callback):
    """Ctrl-C (SIGINT) ends the current step, saves `last.ckpt` and stops; a second one aborts.

    Stopping by exception, not `trainer.should_stop`, skips the validation Lightning would run
    first. The check is reduced over ranks, so all of them stop at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)
            if trainer.is_global_zero:
                log.info("Ctrl-C saves a checkpoint after the current step and stops training.")

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous_handler)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Mid-accumulation the gradients so far would be lost while the data position counts
        # their batches as done, so stop only where an optimizer step has just been taken.
        if not optimizer_stepped(trainer, batch_idx):
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(
            f"Interrupted: saved step {trainer.global_step} to {path}. Continue with "
            f"`python scripts/train.py <same options> resume={path.parent.parent}`."
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


class LastCheckpointAtEnd(Callback):
    """Makes `last.ckpt` hold the final step when training ends.

    ModelCheckpoint writes it only every N steps and after a validation with a new best. So
    without this, a finished run could leave an older `last.ckpt`, and resuming it would
    repeat steps.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = last_checkpoint_path(trainer)
        stale = trainer.strategy.broadcast(saved_step(path) != trainer.global_step)
        if stale:
            trainer.save_checkpoint(path, weights_only=False)


class ThroughputSummary(Callback):
    """Tokens/s and MFU over the whole run, printed and logged when training ends.

    ThroughputMonitor logs a moving window; this is the one number per run a user compares.
    Time runs from the end of one training batch to the end of the next, so data loading
    counts, validation does not, and the first `warmup_batches` (compilation, allocator
    warm-up) are left out. MFU divides by the peak of the device in use, as Lightning
    knows it; it is left out where Lightning knows none (CPUs).
    """

    def __init__(self, warmup_batches: int = 2) -> None:
        self.warmup_batches = warmup_batches
        self.seconds = 0.0
        self.batches = 0
        self.tokens = 0
        self._seen = 0
        self._last: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = self._now(trainer)
        self._seen += 1
        if self._last is not None and self._seen > self.warmup_batches:
            self.seconds += now - self._last
            self.batches += 1
            self.tokens += tokens_in_batch(batch)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.batches:
            return
        tokens_per_s = self.tokens / self.seconds * trainer.world_size
        metrics = {"throughput/run_tokens_per_sec": tokens_per_s}
        message = (
            f"Throughput: {tokens_per_s:,.0f} tokens/s, "
            f"{1000 * self.seconds / self.batches:.1f} ms/batch on {trainer.world_size} "
            f"x {trainer.strategy.root_device.type}"
        )
        flops_per_batch = getattr(pl_module, "flops_per_batch", None)
        if flops_per_batch:
            flops_per_s = flops_per_batch * self.batches / self.seconds
            message += f", {flops_per_s / 1e12:.3f} TFLOP/s per device"
            peak = get_available_flops(
                trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin)
            )
            if peak:
                metrics["throughput/run_mfu"] = flops_per_s / peak
                message += f", MFU {flops_per_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s peak"
            else:
                message += ", MFU n/a (Lightning knows no peak FLOP/s for this device)"
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(message)
