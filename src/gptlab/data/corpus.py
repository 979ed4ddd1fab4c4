"""Reading corpora: CPython's docs, text files, sha256-pinned downloads and Hugging Face datasets.

`CorpusSpec` holds the one list of corpus keys of the `data` group and is the only place that
asks which source a corpus comes from. It knows nothing of tokens or windows.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.errors import ConfigError

if TYPE_CHECKING:
    import datasets

SOURCES = ("pydocs", "text_files", "hf", "download", "prepared")
# utf-8-sig: a byte-order mark is a file's encoding marker, not a character of it.
TEXT_ENCODING = "utf-8-sig"
# Seconds to wait for the Hugging Face hub before saying it cannot be reached.
HUB_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
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
    """`datasets` fails on bad bytes, and on a file it cannot read, with an error naming
    neither the file nor the position; this does."""
    try:
        check_utf8_chunks(path, chunk_size)
    except OSError as err:
        raise ConfigError(
            f"{path} cannot be read ({err.strerror or err}): check that it is a readable text "
            f"file (ls -l {path}), or point data.path at another."
        ) from None


def check_utf8_chunks(path: str, chunk_size: int) -> None:
    """Decode the file a chunk at a time, so a large corpus is never held whole."""
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


def read_text_file(path: str) -> str:
    """A UTF-8 file's text, read once; a bad byte or an unreadable file is named."""
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        check_utf8(path)
        raise


def load_pydocs() -> list[str]:
    """CPython's own topic documentation: English prose and code that every Python ships."""
    from pydoc_data.topics import topics

    return list(topics.values())


def offline_mode() -> bool:
    """Hugging Face's offline switches: datasets then reads its cache only, without retries."""
    return "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers at all, so an offline machine fails in seconds."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from: the corpus keys of the `data` group, and nothing else."""

    source: str = "pydocs"
    path: str | list[str] | None = None  # text_files: a file, a glob or a list of them
    corpus: str | None = None  # download: a name in CORPORA
    name: str | None = None  # hf: the dataset id
    config: str | None = None  # hf: the dataset's configuration
    split: str = "train"  # hf: the split to read
    text_column: str = "text"  # hf: the column holding the text
    dir: str | None = None  # prepared: the folder scripts/prepare_data.py wrote

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is unknown: use one of {SOURCES}.")
        required = {"text_files": "path", "download": "corpus", "hf": "name", "prepared": "dir"}
        key = required.get(self.source)
        if key and not getattr(self, key):
            example = {
                "path": "<file, glob or list of files>",
                "corpus": f"<one of {', '.join(CORPORA)}>",
                "name": "<Hugging Face dataset id>",
                "dir": "<folder written by scripts/prepare_data.py>",
            }[key]
            raise ConfigError(f"data={self.source} needs data.{key}={example}.")
        if self.source == "download" and self.corpus not in CORPORA:
            raise ConfigError(
                f"data.corpus={self.corpus!r} is unknown: choose one of {list(CORPORA)}."
            )

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CorpusSpec:
        """The corpus keys of a `data` group (its other keys are the loader's)."""
        return cls(**{key: data[key] for key in cls.key_names() if key in data})

    def describe(self) -> str:
        """The corpus as a user named it, for messages."""
        return {
            "pydocs": "pydoc_data.topics",
            "text_files": f"data.path={self.path!r}",
            "download": f"corpus {self.corpus!r}",
            "hf": f"Hugging Face dataset {self.name!r}",
            "prepared": f"data.dir={self.dir!r}",
        }[self.source]

    def files(self) -> list[str]:
        """The local files of a `text_files` or `download` source, downloaded first if need be."""
        if self.source == "download":
            return [str(fetch_corpus(CORPORA[self.corpus]))]
        if self.source == "text_files":
            return resolve_text_files(self.path)
        return []

    def documents(self, keep_in_memory: bool = True) -> datasets.Dataset:
        """One document per row, in column `text`; larger-than-memory sources stay on disk."""
        import datasets

        if self.source == "pydocs":
            return datasets.Dataset.from_dict({"text": load_pydocs()})
        if self.source in ("text_files", "download"):
            files = self.files()
            for path in files:
                check_utf8(path)
            return datasets.load_dataset(
                "text",
                data_files=files,
                sample_by="document",
                split="train",
                encoding=TEXT_ENCODING,
                keep_in_memory=keep_in_memory,
            )
        if self.source == "hf":
            return self.hub_dataset()
        raise ConfigError(
            "data=prepared is already tokenised: give the corpus it came from (data=pydocs, "
            "text_files, hf or a download) to read its text."
        )

    def hub_dataset(self) -> datasets.Dataset:
        """The Hugging Face dataset's text column, renamed `text`."""
        import datasets

        offline_fix = (
            "with a copy in the datasets cache, set HF_DATASETS_OFFLINE=1; or save the text to "
            "files and use data=text_files data.path=<files>"
        )
        if not offline_mode() and not hub_reachable():
            raise ConfigError(
                f"data=hf needs the Hugging Face hub to load {self.name!r}, and it cannot be "
                f"reached within {HUB_TIMEOUT_S:.0f} s: {offline_fix}."
            )
        try:
            dataset = datasets.load_dataset(self.name, self.config, split=self.split)
        except (ConnectionError, OSError, ValueError) as err:
            raise ConfigError(
                f"Could not load Hugging Face dataset {self.name!r} (config {self.config!r}, "
                f"split {self.split!r}): {str(err).strip().splitlines()[0]}. Check data.name, "
                f"data.config and data.split; offline, {offline_fix}."
            ) from None
        if self.text_column not in dataset.column_names:
            raise ConfigError(
                f"data.text_column={self.text_column!r} is not a column of {self.name} "
                f"({self.split}): choose one of {dataset.column_names}."
            )
        return dataset.select_columns([self.text_column]).rename_column(self.text_column, "text")

    def text(self) -> str:
        """The whole corpus as one string, documents separated by a blank line. Local text is
        read here, as `documents` reads it: `datasets` would add its import and an Arrow copy
        to the start of every run."""
        if self.source == "pydocs":
            documents = load_pydocs()
        elif self.source in ("text_files", "download"):
            documents = [read_text_file(path) for path in self.files()]
        else:
            documents = self.documents()["text"]
        text = "\n\n".join(documents)
        if not text.strip():
            raise ConfigError(
                f"The corpus from {self.describe()} is empty ({len(text)} characters): give it "
                f"some text."
            )
        return text

    def fingerprint(self, dataset: datasets.Dataset) -> str:
        """What identifies the source's content, for a prepared corpus's metadata."""
        if self.source in ("text_files", "download"):
            digests = "".join(sha256_of(Path(f)) for f in self.files())
            return f"sha256:{hashlib.sha256(digests.encode()).hexdigest()}"
        if self.source == "hf":
            info = dataset.info
            split = info.splits.get(self.split) if info.splits else None
            described = {
                "name": self.name,
                "config": self.config,
                "split": self.split,
                "version": str(info.version),
                "examples": split.num_examples if split else len(dataset),
                "bytes": split.num_bytes if split else None,
                "checksums": sorted(info.download_checksums or {}),
            }
            digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
            return f"datasets-info:{digest}"
        return f"sha256:{hashlib.sha256(chr(0).join(dataset['text']).encode()).hexdigest()}"
