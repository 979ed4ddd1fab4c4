"""Corpora, token streams and the stride windows a GPT trains on.

The flow is corpus text -> tokenizer -> token stream -> train/val split -> windows of
`context_length` inputs whose targets are the same tokens shifted by one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.errors import ConfigError
from gptlab.sampling import ResumableDataLoader, ResumableSampler
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, build_tokenizer

if TYPE_CHECKING:
    import datasets

    from gptlab.prepared import TokenFile

SOURCES = ("pydocs", "text_files", "hf", "download", "prepared")


@dataclass(frozen=True)
class DownloadableCorpus:
    """A public text file, pinned by its sha256 so every user trains on the same bytes."""

    url: str
    sha256: str
    filename: str


CORPORA: dict[str, DownloadableCorpus] = {
    "tinyshakespeare": DownloadableCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
    ),
    "verdict": DownloadableCorpus(
        url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        filename="the-verdict.txt",
    ),
}


def data_dir() -> Path:
    """Where downloaded corpora are cached: `$GPTLAB_DATA_DIR`, else ~/.cache/gptlab/data."""
    return Path(os.environ.get("GPTLAB_DATA_DIR", "~/.cache/gptlab/data")).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_corpus(corpus: DownloadableCorpus, directory: Path | None = None) -> Path:
    """The corpus file, downloaded and hash-checked unless a verified copy is cached."""
    directory = directory or data_dir()
    target = directory / corpus.filename
    if target.is_file() and sha256_of(target) == corpus.sha256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
        try:
            with urllib.request.urlopen(corpus.url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            os.unlink(tmp.name)
            raise ConfigError(
                f"Could not download {corpus.url} ({err}). Without network access, put the file "
                f"at {target} (sha256 {corpus.sha256}) or set GPTLAB_DATA_DIR to a folder "
                f"holding {corpus.filename}."
            ) from None
    actual = sha256_of(Path(tmp.name))
    if actual != corpus.sha256:
        os.unlink(tmp.name)
        raise ConfigError(
            f"{corpus.url} has sha256 {actual}, expected {corpus.sha256}: the download is "
            f"corrupt or the file changed upstream; retry, or place a verified copy at {target}."
        )
    os.replace(tmp.name, target)
    return target


def resolve_text_files(path: str | list[str]) -> list[str]:
    """Files named by a path, a glob or a list of them; an error names what matched nothing."""
    patterns = [path] if isinstance(path, str) else list(path)
    if not patterns:
        raise ConfigError("data.path is empty: give a text file, a glob or a list of files.")
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise ConfigError(
                f"data.path={pattern!r} matches no file (searched from {os.getcwd()}): "
                f"check the path, or quote a glob such as 'data.path=\"corpus/*.txt\"'."
            )
        directories = [m for m in matches if not os.path.isfile(m)]
        if directories:
            raise ConfigError(
                f"data.path={pattern!r} matches {directories[0]!r}, which is not a file: "
                f"point at text files, e.g. '{directories[0]}/*.txt'."
            )
        files.extend(matches)
    return files


def check_utf8(path: str, chunk_size: int = 1 << 20) -> None:
    """`datasets` fails on bad bytes with an error naming neither file nor position; this does."""
    offset, pending = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            data = pending + chunk
            try:
                data.decode("utf-8")
                offset, pending = offset + len(data), b""
            except UnicodeDecodeError as err:
                if err.reason != "unexpected end of data" or err.end != len(data):
                    raise ConfigError(
                        f"{path} is not UTF-8 text: byte {offset + err.start} is "
                        f"{data[err.start : err.start + 1]!r} ({err.reason}). Convert the file, "
                        f"e.g. `iconv -f latin1 -t utf-8 {path} > {path}.utf8`, and point "
                        f"data.path at the converted copy."
                    ) from None
                # A character split across two chunks: decode it with the next chunk.
                offset, pending = offset + err.start, data[err.start :]
    if pending:
        raise ConfigError(
            f"{path} is not UTF-8 text: it ends inside a character at byte {offset} "
            f"(truncated?). Convert or repair the file and point data.path at it."
        )


def corpus_files(source: str, path: str | list[str] | None, corpus: str | None) -> list[str]:
    """The local files of a `text_files` or `download` source, downloaded first if need be."""
    if source == "download":
        if corpus not in CORPORA:
            raise ConfigError(f"data.corpus={corpus!r} is unknown: choose one of {list(CORPORA)}.")
        return [str(fetch_corpus(CORPORA[corpus]))]
    if path is None:
        raise ConfigError("data=text_files needs data.path=<file, glob or list of files>.")
    return resolve_text_files(path)


def text_files_dataset(files: list[str], keep_in_memory: bool = True) -> datasets.Dataset:
    """Whole files as documents (one per row, column `text`), via `datasets`' `text` loader."""
    import datasets

    for path in files:
        check_utf8(path)
    return datasets.load_dataset(
        "text", data_files=files, sample_by="document", split="train", keep_in_memory=keep_in_memory
    )


def hf_text_dataset(
    name: str | None, config: str | None, split: str, text_column: str
) -> datasets.Dataset:
    """A Hugging Face dataset's text column, renamed `text`."""
    import datasets

    if not name:
        raise ConfigError("data=hf needs data.name=<Hugging Face dataset id>.")
    dataset = datasets.load_dataset(name, config, split=split)
    if text_column not in dataset.column_names:
        raise ConfigError(
            f"data.text_column={text_column!r} is not a column of {name} ({split}): "
            f"choose one of {dataset.column_names}."
        )
    return dataset.select_columns([text_column]).rename_column(text_column, "text")


def load_pydocs() -> list[str]:
    """CPython's own topic documentation: English prose and code that every Python ships."""
    from pydoc_data.topics import topics

    return list(topics.values())


def corpus_documents(
    source: str = "pydocs",
    path: str | list[str] | None = None,
    corpus: str | None = None,
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    keep_in_memory: bool = True,
) -> datasets.Dataset:
    """The corpus the data group names, one document per row in column `text`."""
    import datasets

    if source == "pydocs":
        return datasets.Dataset.from_dict({"text": load_pydocs()})
    if source in ("text_files", "download"):
        return text_files_dataset(corpus_files(source, path, corpus), keep_in_memory)
    if source == "hf":
        return hf_text_dataset(name, config, split, text_column)
    raise ConfigError(
        f"data.source={source!r} has no text to load: choose one of "
        f"pydocs, text_files, hf, download."
    )


def load_corpus(**source: Any) -> str:
    """The whole corpus as one string, documents separated by a blank line."""
    text = "\n\n".join(corpus_documents(**source)["text"])
    if not text.strip():
        origin = {
            "text_files": f"data.path={source.get('path')!r}",
            "download": f"corpus {source.get('corpus')!r}",
            "hf": f"Hugging Face dataset {source.get('name')!r}",
        }.get(source.get("source", "pydocs"), "pydoc_data.topics")
        raise ConfigError(
            f"The corpus from {origin} is empty ({len(text)} characters): give it some text."
        )
    return text


TokenArray = TypeVar("TokenArray", np.ndarray, "TokenFile")


def split_tokens(tokens: TokenArray, train_ratio: float) -> tuple[TokenArray, TokenArray]:
    """The first `train_ratio` of the stream for training, the rest for validation."""
    n_train = int(len(tokens) * train_ratio)
    return tokens[:n_train], tokens[n_train:]


class TokenWindows(Dataset):
    """Windows of `context_length` tokens every `stride` tokens, targets shifted by one.

    Same windows as the seed's `create_dataloader`: start positions
    `range(0, len(tokens) - context_length, stride)`. The tokens are an array in memory or a
    prepared corpus's `TokenFile`, read one window at a time.
    """

    def __init__(self, tokens: np.ndarray | TokenFile, context_length: int, stride: int) -> None:
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        span = len(self.tokens) - self.context_length
        return 0 if span <= 0 else (span - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride
        chunk = torch.from_numpy(
            self.tokens[start : start + self.context_length + 1].astype(np.int64)
        )
        return chunk[:-1], chunk[1:]


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class GPTDataModule(L.LightningDataModule):
    """Loads a corpus, fits the tokenizer, and serves train/val stride windows."""

    def __init__(
        self,
        source: str = "pydocs",
        tokenizer: str = "gpt2",
        context_length: int = 256,
        batch_size: int = 8,
        stride: int | None = None,
        train_ratio: float = 0.9,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        path: str | list[str] | None = None,
        corpus: str | None = None,
        name: str | None = None,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        dir: str | None = None,
    ) -> None:
        super().__init__()
        stride = context_length if stride is None else stride
        checks = {
            "batch_size": (batch_size, batch_size >= 1, "use 1 or more"),
            "stride": (stride, stride >= 1, "use 1 or more; stride=context_length avoids overlap"),
            "context_length": (context_length, context_length >= 1, "use 1 or more"),
            "train_ratio": (train_ratio, 0.0 < train_ratio < 1.0, "use e.g. 0.9"),
            "num_workers": (num_workers, num_workers >= 0, "use 0 to load in the main process"),
        }
        for key, (value, ok, fix) in checks.items():
            if not ok:
                raise ConfigError(f"data.{key}={value!r} is out of range: {fix}.")
        self.corpus_options = {
            "source": source,
            "path": path,
            "corpus": corpus,
            "name": name,
            "config": config,
            "split": split,
            "text_column": text_column,
        }
        if source == "prepared" and not dir:
            raise ConfigError(
                "data=prepared needs data.dir=<folder written by scripts/prepare_data.py>."
            )
        self.prepared_dir = dir
        self.tokenizer_name = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.stride = stride
        self.train_ratio = train_ratio
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.tokenizer: GPT2Tokenizer | CharTokenizer | None = None
        self.train_tokens: np.ndarray | TokenFile | None = None
        self.val_tokens: np.ndarray | TokenFile | None = None

    def prepare_data(self) -> None:
        """Download once per node, before any process reads the corpus."""
        if self.corpus_options["source"] == "download":
            corpus_files("download", None, self.corpus_options["corpus"])

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        if self.corpus_options["source"] == "prepared":
            # Windows are read from disk one at a time, so memory stays flat.
            from gptlab.prepared import open_prepared

            tokenizer, tokens = open_prepared(self.prepared_dir, self.tokenizer_name)
        else:
            text = load_corpus(**self.corpus_options)
            tokenizer = build_tokenizer(self.tokenizer_name, text)
            tokens = np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))
        train, val = split_tokens(tokens, self.train_ratio)
        needed = self.context_length + 1
        for split_name, split in (("train", train), ("val", val)):
            if len(split) < needed:
                raise ConfigError(
                    f"The {split_name} split has {len(split):,} tokens (corpus {len(tokens):,} "
                    f"tokens, data.train_ratio={self.train_ratio}), fewer than the "
                    f"context_length + 1 = {needed} one window needs: lower "
                    f"model.context_length, adjust data.train_ratio, or use a larger corpus."
                )
        train_windows = len(TokenWindows(train, self.context_length, self.stride))
        if self.drop_last and train_windows < self.batch_size:
            raise ConfigError(
                f"The train split makes {train_windows} windows, fewer than "
                f"data.batch_size={self.batch_size}, so drop_last would leave no batch: lower "
                f"data.batch_size or data.stride, or set data.drop_last=false."
            )
        self.tokenizer, self.train_tokens, self.val_tokens = tokenizer, train, val

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tokens, shuffle=self.shuffle, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, shuffle=False, drop_last=False)

    def _loader(
        self, tokens: np.ndarray | TokenFile | None, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        if tokens is None:
            raise RuntimeError("GPTDataModule.setup() must run before asking for a dataloader.")
        windows = TokenWindows(tokens, self.context_length, self.stride)
        return ResumableDataLoader(
            windows,
            sampler=ResumableSampler(windows, shuffle=shuffle),
            batch_size=self.batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
