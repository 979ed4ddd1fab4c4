"""Pre-tokenised corpora: prepare_data.py's token file, and training windows read from it."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, needs_tiktoken, run_script
from gptlab.data import GPTDataModule, TokenWindows, split_tokens
from gptlab.errors import ConfigError
from gptlab.prepared import open_prepared, prepare_corpus
from gptlab.tokenizers import GPT2Tokenizer

WORDS = ["the", "a", "model", "token", "window", "memory", "corpus", "train", "loss", "of"]


def write_corpus(directory: Path, n_files: int, words_per_file: int, seed: int = 0) -> list[Path]:
    """Generated text files, one document each, with punctuation and line breaks."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        words = [
            rng.choice(WORDS) + rng.choice(["", "", ",", ".\n"]) for _ in range(words_per_file)
        ]
        path = directory / f"doc{i:03d}.txt"
        path.write_text(" ".join(words))
        files.append(path)
    return files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, dict]:
    root = tmp_path_factory.mktemp("prepared")
    files = write_corpus(root / "corpus", n_files=12, words_per_file=400)
    options = {"source": "text_files", "path": str(root / "corpus" / "*.txt")}
    metadata = prepare_corpus(options, "gpt2", root / "out", num_proc=2)
    return files, root / "out", metadata


@needs_tiktoken
def test_token_file_holds_each_document_then_endoftext(prepared) -> None:
    files, out_dir, metadata = prepared
    tokenizer = GPT2Tokenizer()
    expected = [i for f in files for i in [*tokenizer.encode(f.read_text()), tokenizer.eot_id]]
    tokenizer_back, tokens = open_prepared(out_dir, "gpt2")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert (out_dir / "tokens.bin").stat().st_size == 2 * len(expected)
    saved = json.loads((out_dir / "meta.json").read_text())
    assert saved == metadata
    assert saved["n_tokens"] == len(expected) and saved["n_documents"] == len(files)
    assert saved["tokenizer"] == {"name": "gpt2"} and tokenizer_back.name == "gpt2"
    file_hashes = "".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    assert saved["source_hash"] == "sha256:" + hashlib.sha256(file_hashes.encode()).hexdigest()


@needs_tiktoken
def test_memmap_windows_equal_in_memory_windows(prepared) -> None:
    _, out_dir, _ = prepared
    _, tokens = open_prepared(out_dir, "gpt2")
    in_memory = np.array(tokens)
    for context_length, stride in ((32, 32), (16, 5)):
        mapped = TokenWindows(tokens, context_length, stride)
        loaded = TokenWindows(in_memory, context_length, stride)
        assert len(mapped) == len(loaded) > 50
        for index in range(len(loaded)):
            for a, b in zip(mapped[index], loaded[index], strict=True):
                assert torch.equal(a, b)


@needs_tiktoken
def test_prepared_datamodule_serves_the_split_memmap(prepared) -> None:
    _, out_dir, _ = prepared
    dm = GPTDataModule(
        source="prepared", dir=str(out_dir), context_length=16, batch_size=4, shuffle=False
    )
    dm.setup("fit")
    _, tokens = open_prepared(out_dir, "gpt2")
    train, val = split_tokens(np.array(tokens), 0.9)
    assert isinstance(dm.train_tokens, np.memmap) and isinstance(dm.val_tokens, np.memmap)
    assert np.array_equal(dm.train_tokens, train) and np.array_equal(dm.val_tokens, val)
    inputs, targets = next(iter(dm.val_dataloader()))
    assert inputs.tolist() == [val[i * 16 : i * 16 + 16].tolist() for i in range(4)]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@needs_tiktoken
def test_prepared_errors_name_the_fix(prepared, tmp_path: Path) -> None:
    _, out_dir, _ = prepared
    with pytest.raises(ConfigError, match=r"prepare_data\.py"):
        open_prepared(tmp_path, "gpt2")
    with pytest.raises(ConfigError, match=r"tokenised with gpt2, but model\.tokenizer=char"):
        open_prepared(out_dir, "char")
    with pytest.raises(ConfigError, match=r"data\.dir"):
        GPTDataModule(source="prepared")
    with pytest.raises(ConfigError, match="only gpt2"):
        prepare_corpus({"source": "pydocs"}, "char", tmp_path, num_proc=1)


@needs_tiktoken
@pytest.mark.slow
def test_prepare_script_then_train_from_memmap(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", n_files=4, words_per_file=3000, seed=1)
    out_dir = tmp_path / "prepared"
    result = run_script(
        "prepare_data.py",
        "data=text_files",
        f"data.path={tmp_path / 'corpus'}/*.txt",
        f"out_dir={out_dir}",
        "num_proc=2",
        f"hydra.run.dir={tmp_path / 'prepare_run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data.dir={out_dir}" in result.stdout
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        *TINY_RUN,
        "model.tokenizer=gpt2",
        "data=prepared",
        f"data.dir={out_dir}",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "Throughput:" in result.stdout
