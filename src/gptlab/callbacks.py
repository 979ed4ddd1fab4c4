"""Trainer callbacks and the small functions their configs point at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.generation import check_sampling, encode_prompt, generate
from gptlab.model import count_parameters


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Samples in a batch, for ThroughputMonitor's `batch_size_fn`."""
    return batch[0].shape[0]


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input tokens in a batch, for ThroughputMonitor's `length_fn`: items/s are tokens/s."""
    return batch[0].numel()


def tensorboard_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class TrainingCurves(Callback):
    """Counts training tokens, logs them as `train/tokens_seen`, and plots `loss.png` at the end.

    Keeps the train loss of every batch and the val loss of every validation against tokens
    seen and optimizer steps; checkpoints carry them, so a resumed run plots its whole history.
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
        for logger in tensorboard_loggers(trainer):
            logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
        self.logged = True
