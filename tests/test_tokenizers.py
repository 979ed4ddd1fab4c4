"""GPT-2 BPE and character tokenizers, and their round trip through a checkpoint dict."""

from __future__ import annotations

import pytest

from conftest import needs_tiktoken
from gptlab.errors import ConfigError
from gptlab.model.tokenizers import CharTokenizer, build_tokenizer, tokenizer_from_dict


@needs_tiktoken
def test_gpt2_tokenizer_gives_openai_ids() -> None:
    tokenizer = build_tokenizer("gpt2")
    assert tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tokenizer.decode([15496, 11, 314, 716]) == "Hello, I am"


@needs_tiktoken
def test_gpt2_tokenizer_survives_its_dict() -> None:
    tokenizer = tokenizer_from_dict(build_tokenizer("gpt2").to_dict())
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_char_tokenizer_round_trips_and_is_sorted() -> None:
    text = "hello, world!\nzebra"
    tokenizer = build_tokenizer("char", text)
    assert tokenizer.vocab_size == len(set(text))
    assert tokenizer.chars == "".join(sorted(set(text)))
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    restored = tokenizer_from_dict(tokenizer.to_dict())
    assert restored.encode(text) == ids


def test_char_tokenizer_names_unknown_characters() -> None:
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ConfigError, match=r"'xé'"):
        tokenizer.encode("abxé")


def test_unknown_tokenizer_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="gpt2, char"):
        build_tokenizer("sentencepiece")
