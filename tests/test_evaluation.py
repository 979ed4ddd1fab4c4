"""Scoring: token-weighted loss and accuracy over training's windows, and the token table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gptlab.errors import ConfigError
from gptlab.inference.evaluation import format_rows, score, token_rows, token_windows
from gptlab.model.gpt import GPTConfig, GPTModel
from gptlab.model.tokenizers import CharTokenizer

TEXT = "the cat sat on the mat; the rat ate the hat. "


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(TEXT)


@pytest.fixture
def model(tokenizer: CharTokenizer) -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=16, n_heads=2, n_layers=1
    )
    return GPTModel(cfg).eval()


def test_score_is_the_token_weighted_mean_over_all_windows(model, tokenizer) -> None:
    tokens = np.array(tokenizer.encode(TEXT * 3))
    windows = token_windows(tokens, context_length=8, stride=5)
    result = score(model, DataLoader(windows, batch_size=3), torch.device("cpu"))
    inputs = torch.stack([windows[i][0] for i in range(len(windows))])
    targets = torch.stack([windows[i][1] for i in range(len(windows))])
    with torch.no_grad():
        logits = model(inputs)
    assert result.tokens == targets.numel() == len(windows) * 8
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    correct = (logits.argmax(-1) == targets).sum().item()
    assert result.accuracy == pytest.approx(correct / targets.numel())


def test_windows_start_where_training_starts_them(tokenizer) -> None:
    tokens = np.arange(30)
    windows = token_windows(tokens, context_length=8, stride=None)
    starts = [int(windows[i][0][0]) for i in range(len(windows))]
    assert starts == list(range(0, 30 - 8, 8))


def test_text_shorter_than_the_context_is_one_window() -> None:
    windows = token_windows(np.arange(5), context_length=8, stride=None)
    assert len(windows) == 1
    inputs, targets = windows[0]
    assert inputs.tolist() == [0, 1, 2, 3] and targets.tolist() == [1, 2, 3, 4]


def test_a_single_token_cannot_be_scored() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        token_windows(np.arange(1), context_length=8, stride=None)


def test_token_table_rows_follow_the_text(model, tokenizer) -> None:
    tokens = np.array(tokenizer.encode(TEXT))
    windows = token_windows(tokens, context_length=8, stride=None)
    rows = token_rows(model, tokenizer, windows, 10, torch.device("cpu"))
    assert [row.context for row in rows] == [TEXT[: i + 1] for i in range(8)] + [
        TEXT[8:9],
        TEXT[8:10],
    ]
    assert [row.target for row in rows] == list(TEXT[1:11])
    with torch.no_grad():
        logprobs = model(windows[0][0][None])[0].log_softmax(-1)
    for position, row in enumerate(rows[:8]):
        target = tokenizer.encode(row.target)[0]
        assert row.target_logprob == pytest.approx(logprobs[position, target].item(), abs=1e-5)
        assert row.correct == (tokenizer.decode([int(logprobs[position].argmax())]) == row.target)
    table = format_rows(rows).splitlines()
    assert len(table) == 11 and "log p(target)" in table[0]
    assert all(("✓" in line) != ("✗" in line) for line in table[1:])
