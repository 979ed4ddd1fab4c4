"""Pre-tokenised corpora: token ids in a `.bin` file plus a JSON of metadata.

A corpus far larger than memory is tokenised once, in parallel with `datasets.map`, into
`tokens.bin` (uint16 for GPT-2's 50,257 ids). Training then reads each window straight from
that file (`TokenFile`), so memory does not grow with the corpus. Each document is followed by
`<|endoftext|>`, as in GPT-2's training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.compute as pc

from gptlab.atomic import atomic_write_text, replacing
from gptlab.data.corpus import CorpusSpec
from gptlab.errors import ConfigError
from gptlab.model.tokenizers import CharTokenizer, GPT2Tokenizer, tokenizer_from_dict

TOKENS_FILE = "tokens.bin"
METADATA_FILE = "meta.json"
TOKEN_DTYPES = ("uint16", "uint32")
# Ids read from the start of tokens.bin to check they belong to the tokenizer.
SAMPLED_IDS = 1 << 20

_tokenizer: GPT2Tokenizer | None = None


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned dtype that holds every id: uint16 for GPT-2's 50,257."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def encode_documents(batch: dict[str, list[str]]) -> dict[str, list]:
    """GPT-2 ids of each document followed by `<|endoftext|>` (run in `datasets.map` workers)."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = GPT2Tokenizer()
    # numpy rows, not lists: a Python int per token costs ~36 bytes until the batch is written.
    ids = [
        np.array([*_tokenizer.encode(text), _tokenizer.eot_id], dtype=np.uint32)
        for text in batch["text"]
    ]
    return {"ids": ids, "n_tokens": [len(row) for row in ids]}


def prepare_corpus(
    corpus: CorpusSpec, tokenizer: str, out_dir: Path, num_proc: int
) -> dict[str, Any]:
    """Tokenise the corpus into `out_dir/tokens.bin` and `meta.json`; return the metadata."""
    if tokenizer != "gpt2":
        raise ConfigError(
            f"tokenizer={tokenizer!r} cannot be prepared: only gpt2 has a fixed vocabulary. "
            f"Char-level corpora are small: train on them directly with data=text_files."
        )
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc} must be at least 1.")
    # Row by row from Arrow files on disk: the corpus may be larger than memory.
    dataset = corpus.documents(keep_in_memory=False)
    import datasets

    encoder = GPT2Tokenizer()
    dtype = token_dtype(encoder.vocab_size)
    tokenized = dataset.map(
        encode_documents,
        batched=True,
        # Small batches bound each worker's memory when documents are long.
        batch_size=64,
        writer_batch_size=64,
        num_proc=min(num_proc, len(dataset)) if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        # Cached ids in the width they are stored in, not datasets' default int64.
        features=datasets.Features(
            {
                "ids": datasets.Sequence(datasets.Value(np.dtype(dtype).name)),
                "n_tokens": datasets.Value("int64"),
            }
        ),
        desc="Tokenising",
    )
    n_tokens = int(np.sum(tokenized["n_tokens"], dtype=np.int64))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Plain writes, not a memmap, whose written pages would stay in this process's RSS.
    with replacing(out_dir / TOKENS_FILE) as out:
        # Arrow batches flatten to numpy without a Python int per token, so memory stays at
        # one batch of documents.
        for batch in tokenized.with_format("arrow").iter(batch_size=64):
            pc.list_flatten(batch.column("ids")).to_numpy().astype(dtype, copy=False).tofile(out)
        written = out.tell() // np.dtype(dtype).itemsize
        if written != n_tokens:
            raise RuntimeError(f"Wrote {written:,} tokens to {TOKENS_FILE}, counted {n_tokens:,}.")
    metadata = {
        "tokenizer": encoder.to_dict(),
        "dtype": np.dtype(dtype).name,
        "n_tokens": n_tokens,
        "n_documents": len(dataset),
        "source": dataclasses.asdict(corpus),
        "source_hash": corpus.fingerprint(dataset),
    }
    atomic_write_text(out_dir / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return metadata


class ReadOnlyFile:
    """A file descriptor that a TokenFile and its slices share, opened again after unpickling.

    Positioned reads (`pread`) keep no file offset, so DataLoader workers forked with the
    descriptor can read at once without racing; spawned workers unpickle their own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __getstate__(self) -> Path:
        return self.path

    def __setstate__(self, path: Path) -> None:
        self.__init__(path)

    def __del__(self) -> None:
        if hasattr(self, "fd"):  # not when os.open itself failed
            os.close(self.fd)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fill `out` from byte `offset`; one read may return less (Linux: at most ~2 GiB)."""
        buffer = memoryview(out).cast("B")
        filled = 0
        while filled < len(buffer):
            chunk = self._read(len(buffer) - filled, offset + filled)
            if not chunk:
                raise OSError(
                    f"{self.path} ended {len(buffer) - filled} bytes early at {offset + filled}."
                )
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)

    def _read(self, size: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self.fd, size, offset)
        # Windows has no pread; its workers are spawned, so each has its own offset.
        os.lseek(self.fd, offset, os.SEEK_SET)
        return os.read(self.fd, size)


class TokenFile:
    """The token ids of a `tokens.bin`, read from disk slice by slice.

    Not an `np.memmap`: pages a memmap has read stay mapped and count in the process's RSS,
    so a run's RSS climbs towards the file's size, and the kernel's read-ahead maps megabytes
    around every random window. A read leaves its pages in the OS's shared, reclaimable page
    cache instead. As with numpy, slicing gives a view; `astype` and `np.asarray` read.
    """

    def __init__(self, file: ReadOnlyFile, dtype: np.dtype, start: int, stop: int) -> None:
        self.file = file
        self.dtype = np.dtype(dtype)
        self.start = start
        self.stop = stop

    @classmethod
    def open(cls, path: Path, dtype: str, n_tokens: int) -> TokenFile:
        size = path.stat().st_size
        if size != n_tokens * np.dtype(dtype).itemsize:
            raise ConfigError(
                f"{path} holds {size:,} bytes, not the {n_tokens:,} {dtype} tokens its "
                f"{METADATA_FILE} promises: prepare the corpus again."
            )
        return cls(ReadOnlyFile(path), np.dtype(dtype), 0, n_tokens)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> TokenFile:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"A TokenFile takes contiguous slices, not {key!r}.")
        start, stop, _ = key.indices(len(self))
        return TokenFile(self.file, self.dtype, self.start + start, self.start + max(start, stop))

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        tokens = np.empty(len(self), dtype=self.dtype)
        self.file.read_into(tokens, self.start * self.dtype.itemsize)
        return tokens if dtype is None else tokens.astype(dtype)

    def astype(self, dtype: npt.DTypeLike) -> np.ndarray:
        return self.__array__(dtype)


def read_metadata(directory: Path) -> dict[str, Any]:
    """`meta.json`, checked: a missing or malformed key says to prepare the corpus again."""
    again = (
        f"prepare the corpus again with `python scripts/prepare_data.py data=<source> "
        f"out_dir={directory}`"
    )
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file() or not (directory / TOKENS_FILE).is_file():
        raise ConfigError(
            f"data.dir={str(directory)!r} holds no prepared corpus ({METADATA_FILE} and "
            f"{TOKENS_FILE}): create it with `python scripts/prepare_data.py data=<source> "
            f"out_dir={directory}`."
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{meta_path} is not valid JSON ({err}): {again}.") from None
    problems = {
        "tokenizer": isinstance(metadata.get("tokenizer"), dict),
        "dtype": metadata.get("dtype") in TOKEN_DTYPES,
        "n_tokens": isinstance(metadata.get("n_tokens"), int) and metadata["n_tokens"] > 0,
    }
    for key, ok in problems.items():
        if not ok:
            raise ConfigError(
                f"{meta_path} has {key}={metadata.get(key)!r}, which no prepared corpus has "
                f"(dtype is one of {', '.join(TOKEN_DTYPES)}): {again}."
            )
    return metadata


def open_prepared(
    directory: str | Path, tokenizer: str
) -> tuple[GPT2Tokenizer | CharTokenizer, TokenFile]:
    """The tokenizer and the token file that `prepare_corpus` wrote, checked against each other.

    The dtype must be the one the tokenizer's ids are written in, and the file's first ids
    must be ids of the tokenizer: a `meta.json` that lies would otherwise train on garbage.
    """
    directory = Path(directory).expanduser()
    metadata = read_metadata(directory)
    prepared_with = metadata["tokenizer"].get("name")
    if prepared_with != tokenizer:
        raise ConfigError(
            f"data.dir={str(directory)!r} was tokenised with {prepared_with}, but "
            f"model.tokenizer={tokenizer}: use a model with tokenizer {prepared_with}, or "
            f"prepare the corpus again."
        )
    encoder = tokenizer_from_dict(metadata["tokenizer"])
    expected = np.dtype(token_dtype(encoder.vocab_size)).name
    if metadata["dtype"] != expected:
        raise ConfigError(
            f"{directory / METADATA_FILE} says dtype {metadata['dtype']}, but {prepared_with} "
            f"ids are written as {expected}: the metadata does not describe {TOKENS_FILE}; "
            f"prepare the corpus again."
        )
    tokens = TokenFile.open(directory / TOKENS_FILE, metadata["dtype"], metadata["n_tokens"])
    first = np.asarray(tokens[:SAMPLED_IDS])
    if first.size and int(first.max()) >= encoder.vocab_size:
        raise ConfigError(
            f"{directory / TOKENS_FILE} holds id {int(first.max())}, beyond the "
            f"{encoder.vocab_size} ids of {prepared_with}: the file is not what "
            f"{METADATA_FILE} describes; prepare the corpus again."
        )
    return encoder, tokens
