"""Tokenizers: GPT-2 BPE through tiktoken, and a character-level vocabulary.

Each tokenizer turns into a small plain dict (`to_dict`) that is stored in checkpoints,
so a checkpoint alone can encode prompts and decode samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

from gptlab.errors import ConfigError

TOKENIZER_NAMES = ("gpt2", "char")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict: ...


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE; `<|endoftext|>` may appear in text as a document separator."""

    name = "gpt2"
    eot_text = "<|endoftext|>"

    def __init__(self) -> None:
        import tiktoken

        try:
            self._encoding = tiktoken.get_encoding("gpt2")
        except Exception as err:  # tiktoken's download raises whatever requests raises
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            where = f"TIKTOKEN_CACHE_DIR={cache}" if cache else "tiktoken's cache"
            raise ConfigError(
                f"The GPT-2 tokenizer's BPE files (vocab.bpe, encoder.json) are not in {where} "
                f"and could not be downloaded ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). "
                f"tiktoken downloads them once from openaipublic.blob.core.windows.net; offline, "
                f"copy its cache folder from a machine that has it and set TIKTOKEN_CACHE_DIR to "
                f"it, or use a char model (e.g. model=char_small)."
            ) from None
        self.vocab_size: int = self._encoding.n_vocab
        self.eot_id: int | None = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special={self.eot_text})

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))

    def to_dict(self) -> dict:
        return {"name": self.name}


class UnknownCharacters(ConfigError):
    """Text holds characters a char vocabulary lacks; `characters` are they, sorted."""

    def __init__(self, message: str, characters: str) -> None:
        super().__init__(message)
        self.characters = characters


class CharTokenizer:
    """One token per distinct character of the corpus, in sorted order (nanoGPT's char model)."""

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ConfigError("A char tokenizer needs a non-empty corpus to build its vocabulary.")
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._index = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError:
            unknown = "".join(sorted(set(text) - set(self._index)))
            raise UnknownCharacters(
                f"Characters {unknown!r} (code points {[ord(c) for c in unknown]}) are "
                f"not in this char tokenizer's {self.vocab_size}-character vocabulary, which was "
                f"built from the training corpus: remove them from the text.",
                unknown,
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"name": self.name, "chars": self.chars}


def build_tokenizer(name: str, corpus: str | None = None) -> GPT2Tokenizer | CharTokenizer:
    """The named tokenizer; `char` builds its vocabulary from `corpus`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if corpus is None:
            raise ValueError("The char tokenizer is built from a corpus; pass corpus=...")
        return CharTokenizer.from_text(corpus)
    raise ConfigError(f"tokenizer={name!r} is unknown: choose one of {', '.join(TOKENIZER_NAMES)}.")


def tokenizer_from_dict(state: dict) -> GPT2Tokenizer | CharTokenizer:
    """Rebuild a tokenizer saved with `to_dict`, e.g. from a checkpoint's hyperparameters."""
    if state.get("name") == "char":
        return CharTokenizer(state["chars"])
    return build_tokenizer(state.get("name", "?"))
