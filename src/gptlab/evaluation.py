"""Scoring a model on text: loss, perplexity and next-token accuracy over training's windows.

The windows are `data.TokenWindows`, the ones training validates on, so a checkpoint's
evaluated loss on its own val split equals its logged `val/loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gptlab.data import GPTDataModule, TokenWindows, load_corpus, split_tokens
from gptlab.errors import ConfigError
from gptlab.tokenizers import Tokenizer


@dataclass
class Score:
    """Totals over every scored position; the means follow from them."""

    loss_sum: float
    correct: int
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens


@dataclass
class TokenRow:
    """One position of the token table: what the model saw, predicted and should have said."""

    context: str
    predicted: str
    target: str
    correct: bool
    target_logprob: float


def token_windows(tokens: np.ndarray, context_length: int, stride: int | None) -> TokenWindows:
    """Training's windows; a text shorter than one window is scored as one shorter window."""
    if len(tokens) < 2:
        raise ConfigError(
            f"The text has {len(tokens)} token(s); scoring needs at least 2 (an input and "
            f"the token that follows it): give a longer text."
        )
    length = min(context_length, len(tokens) - 1)
    stride = context_length if stride is None else stride
    if stride < 1:
        raise ConfigError(f"stride={stride} must be >= 1, or null for stride = context_length.")
    return TokenWindows(tokens, length, stride)


@torch.inference_mode()
def score(model: nn.Module, windows: DataLoader, device: torch.device) -> Score:
    """Summed cross-entropy, correct argmax predictions and positions over all windows."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for inputs, targets in windows:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs).float().flatten(0, 1)
        targets = targets.flatten()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == targets).sum())
        tokens += targets.numel()
    return Score(loss_sum, correct, tokens)


def shown(text: str, width: int) -> str:
    """`text` as a one-line literal, keeping its end when longer than `width`."""
    literal = repr(text)
    return literal if len(literal) <= width else "…" + literal[-(width - 1) :]


@torch.inference_mode()
def token_rows(
    model: nn.Module, tokenizer: Tokenizer, windows: TokenWindows, n: int, device: torch.device
) -> list[TokenRow]:
    """The first `n` positions, in order, of the first windows: seed 002's token table."""
    model.eval()
    rows: list[TokenRow] = []
    for index in range(len(windows)):
        inputs, targets = windows[index]
        logprobs = model(inputs[None].to(device))[0].float().log_softmax(dim=-1).cpu()
        for position in range(len(targets)):
            if len(rows) == n:
                return rows
            predicted, target = int(logprobs[position].argmax()), int(targets[position])
            rows.append(
                TokenRow(
                    context=tokenizer.decode(inputs[: position + 1].tolist()),
                    predicted=tokenizer.decode([predicted]),
                    target=tokenizer.decode([target]),
                    correct=predicted == target,
                    target_logprob=float(logprobs[position, target]),
                )
            )
    return rows


def format_rows(rows: list[TokenRow], context_width: int = 40, token_width: int = 14) -> str:
    header = (
        f"{'#':>4}  {'context so far':<{context_width}}  {'predicted':<{token_width}}  "
        f"{'':1}  {'target':<{token_width}}  log p(target)"
    )
    lines = [header]
    for i, row in enumerate(rows, start=1):
        lines.append(
            f"{i:>4}  {shown(row.context, context_width):<{context_width}}  "
            f"{shown(row.predicted, token_width):<{token_width}}  {'✓' if row.correct else '✗'}  "
            f"{shown(row.target, token_width):<{token_width}}  {row.target_logprob:13.4f}"
        )
    return "\n".join(lines)


def text_file_tokens(path: str, tokenizer: Tokenizer) -> np.ndarray:
    """All tokens of one text file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"text_file={path!r} could not be read ({err}): give a UTF-8 text file."
        ) from None
    if not text.strip():
        raise ConfigError(
            f"text_file={path!r} is empty ({len(text)} characters): give a file with some text."
        )
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def data_split_tokens(
    data: dict, tokenizer: Tokenizer, split: str
) -> tuple[np.ndarray, GPTDataModule]:
    """The train or val tokens of a `data=` config, split exactly as training splits them.

    The datamodule comes back for its window settings (stride, batch size); the tokens are
    encoded with the model's own tokenizer, never one rebuilt from this corpus.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r} is unknown: use train or val.")
    datamodule = GPTDataModule(**data)
    datamodule.prepare_data()
    text = load_corpus(**datamodule.corpus_options)
    train, val = split_tokens(np.asarray(tokenizer.encode(text)), datamodule.train_ratio)
    return (train if split == "train" else val), datamodule
