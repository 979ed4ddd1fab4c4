"""Pre-tokenised corpora: prepare_data.py's token file, and training windows read from it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, make_datamodule, needs_tiktoken, run_script
from gptlab.data.corpus import CorpusSpec
from gptlab.data.datamodule import TokenWindows, split_tokens
from gptlab.data.prepared import TokenFile, open_prepared, prepare_corpus
from gptlab.errors import ConfigError
from gptlab.inference.loading import load_checkpoint
from gptlab.model.tokenizers import GPT2Tokenizer
from gptlab.training.module import next_token_loss

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
    corpus = CorpusSpec(source="text_files", path=str(root / "corpus" / "*.txt"))
    metadata = prepare_corpus(corpus, "gpt2", root / "out", num_proc=2)
    return files, root / "out", metadata


@needs_tiktoken
def test_token_file_holds_each_document_then_endoftext(prepared) -> None:
    files, out_dir, metadata = prepared
    tokenizer = GPT2Tokenizer()
    expected = [i for f in files for i in [*tokenizer.encode(f.read_text()), tokenizer.eot_id]]
    tokenizer_back, tokens = open_prepared(out_dir, "gpt2")
    assert isinstance(tokens, TokenFile) and tokens.dtype == np.uint16
    assert np.asarray(tokens).tolist() == expected
    assert (out_dir / "tokens.bin").stat().st_size == 2 * len(expected)
    saved = json.loads((out_dir / "meta.json").read_text())
    assert saved == metadata
    assert saved["n_tokens"] == len(expected) and saved["n_documents"] == len(files)
    assert saved["tokenizer"] == {"name": "gpt2"} and tokenizer_back.name == "gpt2"
    file_hashes = "".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    assert saved["source_hash"] == "sha256:" + hashlib.sha256(file_hashes.encode()).hexdigest()


def write_token_file(path: Path, n_tokens: int) -> tuple[TokenFile, np.ndarray]:
    tokens = np.random.default_rng(0).integers(0, 50257, n_tokens, dtype=np.uint16)
    tokens.tofile(path)
    return TokenFile.open(path, "uint16", n_tokens), tokens


@pytest.mark.parametrize(
    "key",
    [
        slice(None),
        slice(10, 20),
        slice(-7, None),
        slice(None, -3),
        slice(990, 2000),
        slice(50, 40),
        slice(-5000, 5),
    ],
)
def test_token_file_slices_read_like_numpy(tmp_path: Path, key: slice) -> None:
    token_file, tokens = write_token_file(tmp_path / "tokens.bin", 1000)
    view = token_file[key]
    assert len(view) == len(tokens[key])
    assert np.array_equal(np.asarray(view), tokens[key])
    assert np.array_equal(view.astype(np.int64), tokens[key].astype(np.int64))
    assert np.array_equal(np.asarray(view[3:9]), tokens[key][3:9])


def test_token_file_is_read_not_mapped(tmp_path: Path) -> None:
    token_file, tokens = write_token_file(tmp_path / "tokens.bin", 100_000)
    windows = TokenWindows(token_file, context_length=64, stride=64)
    for index in range(len(windows)):
        windows[index]
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: a memmap would be listed there, and its read pages in RSS.
        assert "tokens.bin" not in maps.read_text()
    copy = pickle.loads(pickle.dumps(windows))
    # A pickle (a spawned worker's dataset) carries the path, not the tokens.
    assert len(pickle.dumps(windows)) < 1000
    assert torch.equal(copy[7][0], torch.from_numpy(tokens[448:512].astype(np.int64)))


def test_token_file_serves_dataloader_workers(tmp_path: Path) -> None:
    token_file, tokens = write_token_file(tmp_path / "tokens.bin", 20_000)
    windows = TokenWindows(token_file, context_length=32, stride=32)
    loader = torch.utils.data.DataLoader(windows, batch_size=16, num_workers=2)
    inputs = torch.cat([batch for batch, _ in loader])
    expected = torch.from_numpy(tokens[: len(windows) * 32].astype(np.int64)).view(-1, 32)
    assert torch.equal(inputs, expected)


def test_token_file_reads_without_pread(tmp_path: Path, monkeypatch) -> None:
    # Windows has no os.pread; its fallback seeks and reads.
    token_file, tokens = write_token_file(tmp_path / "tokens.bin", 1000)
    monkeypatch.delattr(os, "pread", raising=False)
    assert np.array_equal(np.asarray(token_file[123:456]), tokens[123:456])
    with pytest.raises(OSError, match="ended 2 bytes early"):
        np.asarray(TokenFile(token_file.file, np.dtype("uint16"), 999, 1001))


def test_token_file_reads_on_after_short_reads(tmp_path: Path, monkeypatch) -> None:
    # One read may return less than asked (Linux caps one at ~2 GiB): keep reading.
    token_file, tokens = write_token_file(tmp_path / "tokens.bin", 1000)
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: pread(fd, min(size, 7), offset))
    assert np.array_equal(np.asarray(token_file[10:900]), tokens[10:900])


def test_token_file_size_must_match_its_metadata(tmp_path: Path) -> None:
    write_token_file(tmp_path / "tokens.bin", 1000)
    with pytest.raises(ConfigError, match=r"2,000 bytes, not the 1,001 uint16 tokens"):
        TokenFile.open(tmp_path / "tokens.bin", "uint16", 1001)
    token_file = TokenFile.open(tmp_path / "tokens.bin", "uint16", 1000)
    with pytest.raises(TypeError, match="contiguous slices"):
        token_file[::2]
    with pytest.raises(OSError, match="ended 2 bytes early"):
        np.asarray(TokenFile(token_file.file, np.dtype("uint16"), 999, 1001))


@needs_tiktoken
def test_token_file_windows_equal_in_memory_windows(prepared) -> None:
    _, out_dir, _ = prepared
    _, tokens = open_prepared(out_dir, "gpt2")
    in_memory = np.array(tokens)
    for context_length, stride in ((32, 32), (16, 5)):
        from_disk = TokenWindows(tokens, context_length, stride)
        loaded = TokenWindows(in_memory, context_length, stride)
        assert len(from_disk) == len(loaded) > 50
        for index in range(len(loaded)):
            for a, b in zip(from_disk[index], loaded[index], strict=True):
                assert torch.equal(a, b)


@needs_tiktoken
def test_prepared_datamodule_serves_the_split_token_file(prepared) -> None:
    _, out_dir, _ = prepared
    dm = make_datamodule(
        source="prepared", dir=str(out_dir), context_length=16, batch_size=4, shuffle=False
    )
    dm.setup("fit")
    _, tokens = open_prepared(out_dir, "gpt2")
    train, val = split_tokens(np.array(tokens), 0.9)
    assert isinstance(dm.train_tokens, TokenFile) and isinstance(dm.val_tokens, TokenFile)
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
        make_datamodule(source="prepared")
    with pytest.raises(ConfigError, match="only gpt2"):
        prepare_corpus(CorpusSpec(), "char", tmp_path, num_proc=1)


@needs_tiktoken
@pytest.mark.parametrize(
    ("change", "words"),
    [
        # A uint16 file described as uint8, with the count doubled so the size still matches.
        (lambda meta: {**meta, "dtype": "uint8", "n_tokens": 2 * meta["n_tokens"]}, "uint8"),
        (lambda meta: {**meta, "dtype": "float32", "n_tokens": meta["n_tokens"] // 2}, "float32"),
        (lambda meta: {**meta, "dtype": "uint32", "n_tokens": meta["n_tokens"] // 2}, "uint32"),
        (lambda meta: {**meta, "dtype": "int9"}, "int9"),
        (lambda meta: {k: v for k, v in meta.items() if k != "n_tokens"}, "n_tokens=None"),
    ],
)
def test_metadata_that_lies_about_the_token_file_is_refused(
    prepared, tmp_path: Path, change, words: str
) -> None:
    _, out_dir, metadata = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    (copy / "meta.json").write_text(json.dumps(change(metadata)))
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        open_prepared(copy, "gpt2")
    assert "prepare" in str(err.value)


@needs_tiktoken
def test_metadata_that_is_not_json_is_refused(prepared, tmp_path: Path) -> None:
    _, out_dir, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    (copy / "meta.json").write_text("{'tokenizer': ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        open_prepared(copy, "gpt2")


@needs_tiktoken
@pytest.mark.slow
def test_prepare_script_then_train_and_evaluate_from_token_file(tmp_path: Path) -> None:
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
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert "Throughput:" in result.stdout

    result = run_script(
        "evaluate.py", f"ckpt={last}", "data=prepared", f"data.dir={out_dir}", "split=val"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = load_checkpoint(last)
    datamodule = make_datamodule(source="prepared", dir=str(out_dir), context_length=32)
    datamodule.setup("fit")
    loss_sum, n_targets = 0.0, 0
    with torch.no_grad():
        for inputs, targets in datamodule.val_dataloader():
            loss_sum += next_token_loss(module(inputs), targets).item() * targets.numel()
            n_targets += targets.numel()
    scored = re.search(r"^Scored:\s+([\d,]+) tokens", result.stdout, re.MULTILINE)
    loss = re.search(r"^Loss:\s+([\d.]+)", result.stdout, re.MULTILINE)
    assert scored and loss, result.stdout
    assert int(scored[1].replace(",", "")) == n_targets
    assert float(loss[1]) == pytest.approx(loss_sum / n_targets, abs=1e-4)
