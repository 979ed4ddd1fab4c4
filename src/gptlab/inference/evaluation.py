"""Scoring a model on text: loss, perplexity and next-token accuracy over training's windows.

The windows are `data.TokenWindows`, the ones training validates on, so a checkpoint's
evaluated loss on its whole val split equals its logged `val/loss` on a single device with
every val batch (`trainer.limit_val_batches=1.0`). Continuations are scored as
lm-evaluation-harness scores them (`continuation_logprob`), the reference for
`inference.harness_model`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from gptlab.checks import check_count
from gptlab.data.datamodule import GPTDataModule, LoaderSettings, TokenWindows, check_stride
from gptlab.data.prepared import TokenFile
from gptlab.errors import ConfigError
from gptlab.inference.loading import load_model
from gptlab.model.tokenizers import Tokenizer
from gptlab.training.settings import resolve_device

log = logging.getLogger(__name__)


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


def token_windows(
    tokens: np.ndarray | TokenFile, context_length: int, stride: int | None
) -> TokenWindows:
    """Training's windows (`stride` None: the context length); a text shorter than one window
    is scored as one shorter window."""
    if len(tokens) < 2:
        raise ConfigError(
            f"The text has {len(tokens)} token(s); scoring needs at least 2 (an input and "
            f"the token that follows it): give a longer text."
        )
    length = min(context_length, len(tokens) - 1)
    return TokenWindows(tokens, length, stride or context_length)


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


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """A context's and a continuation's ids, split as lm-evaluation-harness splits them.

    Spaces that end the context move to the continuation, and the two are encoded together
    and cut where the context's own ids end, so a BPE merge across the boundary belongs to the
    continuation. An empty context is `<|endoftext|>`; a tokenizer without one (char) reads
    the continuation's first token as the context, and that token is not scored.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        ids = tokenizer.encode(continuation)
        if tokenizer.eot_id is not None:
            return [tokenizer.eot_id], ids
        return ids[:1], ids[1:]
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


def scoring_windows(n_tokens: int, first: int, context_length: int) -> list[tuple[int, int, int]]:
    """Forward passes that predict tokens `first` to `n_tokens - 1` of a sequence, each once,
    each from at most `context_length` tokens.

    `(start, stop, scored)` feeds tokens[start:stop] and keeps its last `scored` predictions,
    those of tokens[stop - scored + 1 : stop + 1]. The targets go in chunks of
    `context_length`; each chunk's window ends just before its last target and reaches back as
    far as the context allows. A continuation that fits is thus scored after its context cut
    from the left, and a long text in disjoint rolling windows: the harness's loglikelihood
    and loglikelihood_rolling.
    """
    windows = []
    for begin in range(first, n_tokens, context_length):
        end = min(begin + context_length, n_tokens)
        windows.append((max(0, end - 1 - context_length), end - 1, end - begin))
    return windows


@torch.inference_mode()
def continuation_logprob(
    model: nn.Module, tokenizer: Tokenizer, context: str, continuation: str
) -> float:
    """log p(continuation | context), summed over the continuation's tokens, one sequence at a
    time: the plain reference for the batched harness model (`inference.harness_model`)."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor(context_ids + continuation_ids, device=next(model.parameters()).device)
    total = 0.0
    for start, stop, scored in scoring_windows(
        len(ids), len(context_ids), model.config.context_length
    ):
        logprobs = model(ids[None, start:stop])[0, -scored:].float().log_softmax(dim=-1)
        targets = ids[stop - scored + 1 : stop + 1, None]
        total += logprobs.gather(-1, targets).sum().item()
    return total


def multiple_choice_accuracy(
    model: nn.Module, tokenizer: Tokenizer, items: Iterable[tuple[str, Sequence[str], int]]
) -> float:
    """The fraction of items whose gold continuation is the most likely one: a multiple-choice
    task's `acc` in lm-evaluation-harness. An item is (context, continuations, gold index)."""
    model.eval()
    correct = total = 0
    for context, continuations, gold in items:
        scores = [continuation_logprob(model, tokenizer, context, c) for c in continuations]
        correct += scores.index(max(scores)) == gold
        total += 1
    return correct / total


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
    data: dict, tokenizer: Tokenizer, context_length: int, split: str
) -> tuple[np.ndarray | TokenFile, GPTDataModule]:
    """The train or val tokens of a `data=` config, split exactly as training splits them.

    Read through the same data module as training, connected to the model's own tokenizer
    (never one rebuilt from this corpus); it also gives the window settings.
    """
    datamodule = GPTDataModule.from_config(data).connect(tokenizer, context_length)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return (datamodule.train_tokens if split == "train" else datamodule.val_tokens), datamodule


def check_evaluate_config(cfg: DictConfig) -> LoaderSettings | None:
    """Everything that can be wrong with the request, checked before a model is loaded.

    A text file is scored in windows of the `batch_size` and `stride` given here, a data
    config's split in its own (checked when its data module is built).
    """
    has_data = cfg.get("data") is not None
    if bool(cfg.text_file) == has_data:
        raise ConfigError(
            "Give exactly one text to score: text_file=<path> or data=<config> "
            "(e.g. data=verdict split=val), or lm-evaluation-harness tasks instead "
            f"(tasks=hellaswag); got text_file={cfg.text_file!r} and "
            f"data={'set' if has_data else 'not set'}."
        )
    if cfg.show_tokens < 0:
        raise ConfigError(f"show_tokens={cfg.show_tokens} must be >= 0 (0 shows no table).")
    if has_data and cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r} is unknown: use train or val.")
    if not has_data:
        # Checked under their own names: here they are not the data.* keys LoaderSettings names.
        check_count("batch_size", cfg.batch_size, 1)
        check_stride("stride", cfg.stride)
        return LoaderSettings(batch_size=cfg.batch_size, stride=cfg.stride)
    return None


def evaluate(cfg: DictConfig) -> Score:
    """Score the model `cfg` names on the text it names, print the report, return the score."""
    loader = check_evaluate_config(cfg)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.ckpt, cfg.pretrained, cfg.paths.log_dir)
    model, tokenizer = loaded.model.to(device), loaded.tokenizer
    context_length = loaded.config.context_length
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        tokens, datamodule = data_split_tokens(data, tokenizer, context_length, cfg.split)
        text = f"the {cfg.split} split of data={HydraConfig.get().runtime.choices['data']}"
        stride, batch_size = datamodule.stride, datamodule.batch_size
    else:
        tokens = text_file_tokens(cfg.text_file, tokenizer)
        text = f"text_file={cfg.text_file}"
        stride, batch_size = loader.stride, loader.batch_size
    windows = token_windows(tokens, context_length, stride)
    log.info("Scoring %s with %s on %s", text, loaded.source, device)
    result = score(model, DataLoader(windows, batch_size=batch_size), device)
    if cfg.show_tokens:
        print(format_rows(token_rows(model, tokenizer, windows, cfg.show_tokens, device)))
        print()
    print(f"Model:      {loaded.source}")
    print(f"Text:       {text} ({len(tokens):,} tokens)")
    print(
        f"Windows:    {len(windows):,} of {windows.context_length} tokens, stride {windows.stride}"
    )
    print(f"Scored:     {result.tokens:,} tokens")
    print(f"Loss:       {result.loss:.4f}")
    print(f"Perplexity: {result.perplexity:.2f}")
    print(f"Accuracy:   {result.accuracy:.2%} (top-1 next token)")
    return result
