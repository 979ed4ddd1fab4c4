"""Tokenizers: GPT-2 BPE through tiktoken, and a character-level vocabulary.

Each tokenizer turns into a small plain dict (`to_dict`) that is stored in checkpoints,
so a checkpoint alone can encode prompts and decode samples.
"""

from __future__ import annotations

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

        self._encoding = tiktoken.get_encoding("gpt2")
        self.vocab_size: int = self._encoding.n_vocab
        self.eot_id: int | None = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special={self.eot_text})

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))

    def to_dict(self) -> dict:
        return {"name": self.name}


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
            unknown = sorted(set(text) - set(self._index))
            raise ConfigError(
                f"Characters {''.join(unknown)!r} (code points {[ord(c) for c in unknown]}) are "
                f"not in this char tokenizer's {self.vocab_size}-character vocabulary, which was "
                f"built from the training corpus: remove them from the text."
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
