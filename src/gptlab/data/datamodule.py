"""Token streams and the windows a GPT trains on, served by a LightningDataModule.

The flow is corpus text (`gptlab.data.corpus`) -> tokenizer -> token stream -> train/val split ->
windows of `context_length` inputs whose targets are the same tokens shifted by one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.checks import check_count, reject_unknown
from gptlab.data.corpus import CorpusSpec
from gptlab.data.prepared import TokenFile, open_prepared, token_dtype
from gptlab.data.sampling import RandomWindowSampler, ResumableDataLoader, ResumableSampler
from gptlab.errors import ConfigError
from gptlab.model.tokenizers import Tokenizer, build_tokenizer
from gptlab.schema import check_fields

log = logging.getLogger(__name__)

WINDOW_CHOICES = ("strided", "random")
TokenArray = TypeVar("TokenArray", np.ndarray, TokenFile)


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


def check_stride(key: str, stride: Any) -> None:
    """Tokens between window starts; null means the context length, so windows do not overlap."""
    if stride is not None:
        check_count(key, stride, 1, ", or null for the context length (no overlap)")


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """How the token stream is split and served: the loader keys of the `data` group."""

    batch_size: int = 32
    stride: int | None = None  # None: the context length, so training windows do not overlap
    train_ratio: float = 0.9
    shuffle: bool = True
    drop_last: bool = True
    num_workers: int = 0
    # strided: the windows every `stride` tokens, shuffled each epoch. random: training windows
    # start at random offsets, drawn with replacement, as nanoGPT's get_batch does.
    windows: Literal["strided", "random"] = "strided"

    def __post_init__(self) -> None:
        check_count("data.batch_size", self.batch_size, 1)
        check_count("data.num_workers", self.num_workers, 0)
        check_stride("data.stride", self.stride)
        ratio = self.train_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
            raise ConfigError(f"data.train_ratio={ratio!r} must be between 0 and 1, e.g. 0.9.")
        for key in ("shuffle", "drop_last"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"data.{key}={getattr(self, key)!r} must be true or false.")
        if self.windows not in WINDOW_CHOICES:
            raise ConfigError(
                f"data.windows={self.windows!r} is unknown: use strided (every data.stride "
                f"tokens) or random (random offsets, as nanoGPT)."
            )

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))


class GPTDataModule(L.LightningDataModule):
    """Loads a corpus, fits the tokenizer, and serves train/val windows.

    Built from the `data` group alone; the model's tokenizer and context length arrive with
    `connect`, as in litgpt, so training, evaluation and preparation read data the same way.
    """

    def __init__(self, corpus: CorpusSpec, loader: LoaderSettings) -> None:
        super().__init__()
        self.corpus = corpus
        self.loader = loader
        self.tokenizer_choice: Tokenizer | str | None = None
        self.context_length: int | None = None
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: np.ndarray | TokenFile | None = None
        self.val_tokens: np.ndarray | TokenFile | None = None

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> GPTDataModule:
        """From the `data` group; a key that is neither a corpus nor a loader key is named."""
        corpus_keys, loader_keys = CorpusSpec.key_names(), LoaderSettings.key_names()
        reject_unknown("data", data, corpus_keys + loader_keys, "a data setting")
        loader_values = {key: data[key] for key in loader_keys if key in data}
        check_fields("data", LoaderSettings, loader_values)
        check_fields("data", CorpusSpec, {k: data[k] for k in corpus_keys if k in data})
        return cls(CorpusSpec.from_mapping(data), LoaderSettings(**loader_values))

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def stride(self) -> int:
        return self.loader.stride or self.context_length

    def connect(self, tokenizer: Tokenizer | str, context_length: int) -> GPTDataModule:
        """Take the model's tokenizer (an instance, or a name to build from the corpus) and
        context length."""
        self.tokenizer_choice, self.context_length = tokenizer, context_length
        if self.loader.stride is not None and self.loader.stride > context_length:
            unused = 1 - context_length / self.loader.stride
            log.warning(
                "data.stride=%d is longer than model.context_length=%d: %.0f%% of the tokens "
                "are never trained on.",
                self.loader.stride,
                context_length,
                100 * unused,
            )
        return self

    def state_dict(self) -> dict[str, Any]:
        """The data settings a checkpoint's data position belongs to, to compare on resume."""
        loader = dataclasses.asdict(self.loader)
        loader.pop("num_workers")  # how many processes read, not which windows they read
        return {"corpus": dataclasses.asdict(self.corpus), "loader": loader}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resume on other data is allowed, but said: its saved data position means other
        windows."""
        current = self.state_dict()
        for group, saved in state_dict.items():
            for key, value in saved.items():
                if current.get(group, {}).get(key) != value:
                    log.warning(
                        "Resuming with data.%s=%r where the checkpoint trained with %r: the run "
                        "continues on other windows than the saved data position counted.",
                        key,
                        current[group].get(key),
                        value,
                    )

    def prepare_data(self) -> None:
        """Download once per node, before any process reads the corpus."""
        self.corpus.files()

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        if self.context_length is None:
            raise RuntimeError("GPTDataModule.connect(tokenizer, context_length) must come first.")
        name = getattr(self.tokenizer_choice, "name", self.tokenizer_choice)
        if self.corpus.source == "prepared":
            # Windows are read from disk one at a time, so memory stays flat.
            tokenizer, tokens = open_prepared(self.corpus.dir, name)
        else:
            text = self.corpus.text()
            tokenizer = (
                build_tokenizer(name, text)
                if isinstance(self.tokenizer_choice, str)
                else self.tokenizer_choice
            )
            tokens = np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))
        train, val = split_tokens(tokens, self.loader.train_ratio)
        needed = self.context_length + 1
        for split_name, split in (("train", train), ("val", val)):
            if len(split) < needed:
                raise ConfigError(
                    f"The {split_name} split has {len(split):,} tokens (corpus {len(tokens):,} "
                    f"tokens, data.train_ratio={self.loader.train_ratio}), fewer than the "
                    f"context_length + 1 = {needed} one window needs: lower "
                    f"model.context_length, adjust data.train_ratio, or use a larger corpus."
                )
        if stage == "fit":
            self.check_train_batches(len(self.train_windows(train)))
        self.tokenizer, self.train_tokens, self.val_tokens = tokenizer, train, val

    def check_train_batches(self, windows: int) -> None:
        if self.loader.drop_last and windows < self.batch_size:
            raise ConfigError(
                f"The train split makes {windows} windows of {self.context_length} tokens, fewer "
                f"than data.batch_size={self.batch_size}, so no full batch: use "
                f"data.batch_size={max(1, windows)} or less (the book's run on this corpus is "
                f"experiment=verdict_124m), a smaller data.stride, or data.drop_last=false."
            )

    def train_windows(self, tokens: np.ndarray | TokenFile) -> TokenWindows:
        """Random offsets are the windows at every token (stride 1), drawn at random."""
        stride = 1 if self.loader.windows == "random" else self.stride
        return TokenWindows(tokens, self.context_length, stride)

    def train_dataloader(self) -> DataLoader:
        windows = self.train_windows(self.train_tokens)
        if self.loader.windows == "random":
            # An epoch is as many windows as fit side by side, so epochs compare across modes.
            epoch = math.ceil((len(self.train_tokens) - 1) / self.context_length)
            sampler = RandomWindowSampler(windows, epoch_size=epoch)
        else:
            sampler = ResumableSampler(windows, shuffle=self.loader.shuffle)
        return self._loader(windows, sampler, drop_last=self.loader.drop_last)

    def val_dataloader(self) -> DataLoader:
        windows = TokenWindows(self.val_tokens, self.context_length, self.stride)
        return self._loader(windows, ResumableSampler(windows, shuffle=False), drop_last=False)

    def _loader(self, windows: TokenWindows, sampler: ResumableSampler, drop_last: bool):
        if self.tokenizer is None:
            raise RuntimeError("GPTDataModule.setup() must run before asking for a dataloader.")
        return ResumableDataLoader(
            windows,
            sampler=sampler,
            batch_size=self.batch_size,
            drop_last=drop_last,
            num_workers=self.loader.num_workers,
            persistent_workers=self.loader.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
