"""Corpora, splits and stride windows."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, needs_shared_data, needs_tiktoken
from gptlab.data import (
    CORPORA,
    DownloadableCorpus,
    GPTDataModule,
    TokenWindows,
    fetch_corpus,
    load_corpus,
    sha256_of,
    split_tokens,
)
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


def test_pydocs_is_available_without_download() -> None:
    text = load_corpus(source="pydocs")
    assert len(text) > 400_000
    assert "lambda" in text


def test_text_files_glob_loads_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\nline two\n")
    (tmp_path / "b.txt").write_text("second file")
    text = load_corpus(source="text_files", path=str(tmp_path / "*.txt"))
    assert text == "first file\nline two\n\n\nsecond file"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothere.txt.*matches no file"):
        load_corpus(source="text_files", path=str(tmp_path / "nothere.txt"))


def test_empty_corpus_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_corpus(source="text_files", path=str(empty))


def test_short_val_split_names_sizes_and_fix(tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("abcdefghij" * 30)  # 300 characters, 30 of them in val
    datamodule = GPTDataModule(
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
        GPTDataModule(**{option: value})


def test_datamodule_serves_shifted_windows_from_pydocs() -> None:
    datamodule = GPTDataModule(tokenizer="char", context_length=16, batch_size=4)
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
    datamodule = GPTDataModule(source="download", corpus="verdict", context_length=256)
    datamodule.setup("fit")
    assert len(datamodule.train_tokens) + len(datamodule.val_tokens) == 5145


@needs_shared_data
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_cached_corpus_with_the_right_hash_is_not_downloaded(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a verified cached corpus must not be downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = fetch_corpus(CORPORA[name], SHARED_DATA)
    assert sha256_of(path) == CORPORA[name].sha256


@needs_shared_data
def test_download_checks_the_hash(tmp_path: Path) -> None:
    source = SHARED_DATA / "the-verdict.txt"
    good = DownloadableCorpus(source.as_uri(), CORPORA["verdict"].sha256, "the-verdict.txt")
    path = fetch_corpus(good, tmp_path / "cache")
    assert path.read_bytes() == source.read_bytes()

    bad = DownloadableCorpus(source.as_uri(), "0" * 64, "corrupt.txt")
    with pytest.raises(ConfigError, match="expected 0000"):
        fetch_corpus(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "corrupt.txt").exists()
    assert os.listdir(tmp_path / "cache") == ["the-verdict.txt"]


def test_unreachable_download_says_where_to_put_the_file(tmp_path: Path) -> None:
    missing = DownloadableCorpus((tmp_path / "gone.txt").as_uri(), "0" * 64, "gone.txt")
    with pytest.raises(ConfigError, match="GPTLAB_DATA_DIR"):
        fetch_corpus(missing, tmp_path / "cache")
