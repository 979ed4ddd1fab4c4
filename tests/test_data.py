"""Token windows, splits and the data module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_datamodule, needs_shared_data, needs_tiktoken
from gptlab.data.datamodule import TokenWindows, split_tokens
from gptlab.errors import ConfigError


def test_windows_stride_and_one_token_shift() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    windows = TokenWindows(tokens, context_length=4, stride=2)
    # Seed: starts in range(0, len - context_length, stride) = 0, 2, 4.
    assert len(windows) == 3
    pairs = [(x.tolist(), y.tolist()) for x, y in windows]
    assert pairs == [
        ([0, 1, 2, 3], [1, 2, 3, 4]),
        ([2, 3, 4, 5], [3, 4, 5, 6]),
        ([4, 5, 6, 7], [5, 6, 7, 8]),
    ]
    assert windows[0][0].dtype == torch.int64
    with pytest.raises(IndexError):
        windows[3]


@pytest.mark.parametrize(("n_tokens", "context", "stride"), [(5, 4, 4), (9, 4, 4), (257, 256, 1)])
def test_window_count_matches_the_seed_loop(n_tokens: int, context: int, stride: int) -> None:
    seed_starts = list(range(0, n_tokens - context, stride))
    assert len(TokenWindows(np.arange(n_tokens), context, stride)) == len(seed_starts)


def test_too_short_stream_has_no_window() -> None:
    assert len(TokenWindows(np.arange(4), context_length=4, stride=1)) == 0


def test_split_sizes() -> None:
    train, val = split_tokens(np.arange(1000), train_ratio=0.9)
    assert (len(train), len(val)) == (900, 100)
    assert train[-1] + 1 == val[0]


def test_short_val_split_names_sizes_and_fix(tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("abcdefghij" * 30)  # 300 characters, 30 of them in val
    datamodule = make_datamodule(
        source="text_files", path=str(corpus), tokenizer="char", context_length=32
    )
    with pytest.raises(ConfigError) as err:
        datamodule.setup("fit")
    message = str(err.value)
    for words in ("val split has 30 tokens", "context_length + 1 = 33", "model.context_length"):
        assert words in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", 0), ("stride", 0), ("train_ratio", 1.0), ("train_ratio", 0.0)],
)
def test_bad_loader_options_fail_at_construction(option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"data.{option}={value}"):
        make_datamodule(**{option: value})


def test_datamodule_serves_shifted_windows_from_pydocs() -> None:
    datamodule = make_datamodule(tokenizer="char", context_length=16, batch_size=4)
    datamodule.setup("fit")
    n_tokens = len(datamodule.train_tokens) + len(datamodule.val_tokens)
    assert len(datamodule.train_tokens) == int(n_tokens * 0.9)
    inputs, targets = next(iter(datamodule.val_dataloader()))
    assert inputs.shape == targets.shape == (4, 16)
    torch.testing.assert_close(inputs[0, 1:], targets[0, :-1])
    text = datamodule.tokenizer.decode(datamodule.val_tokens[:16].tolist())
    assert datamodule.tokenizer.decode(inputs[0].tolist()) == text


@needs_shared_data
@needs_tiktoken
def test_verdict_has_the_books_token_count() -> None:
    datamodule = make_datamodule(
        source="download", corpus="verdict", context_length=256, batch_size=2
    )
    datamodule.setup("fit")
    assert len(datamodule.train_tokens) + len(datamodule.val_tokens) == 5145
