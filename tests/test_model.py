"""The GPT model: sizes, attention semantics, KV cache and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import model_preset
from gptlab.errors import ConfigError
from gptlab.model.gpt import BigramModel, GPTConfig, GPTModel, MultiHeadAttention, count_parameters
from gptlab.training.settings import model_settings

TINY = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def test_gpt124m_config_matches_the_seed_and_has_its_parameter_count() -> None:
    settings = model_preset("gpt124m")
    cfg = GPTConfig(**model_settings(settings, vocab_size=0))
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim) == (50257, 256, 768)
    assert (cfg.n_heads, cfg.n_layers, cfg.drop_rate, cfg.qkv_bias) == (12, 12, 0.1, False)
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert count_parameters(model) == 162_419_712


def test_forward_shapes() -> None:
    model = GPTModel(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 7))
    assert model(idx).shape == (3, 7, TINY.vocab_size)
    bigram = BigramModel(TINY)
    assert bigram(idx).shape == (3, 7, TINY.vocab_size)
    assert count_parameters(bigram) == TINY.vocab_size**2


def explicit_attention(att: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The seed's masked-softmax attention, with queries from W_query and keys from W_key."""
    batch, n_tokens, emb_dim = x.shape
    heads, head_dim = att.n_heads, att.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, n_tokens, heads, head_dim).transpose(1, 2)

    queries, keys, values = split(att.W_query(x)), split(att.W_key(x)), split(att.W_value(x))
    scores = queries @ keys.transpose(2, 3)
    future = torch.triu(torch.ones(n_tokens, n_tokens, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, -torch.inf) / math.sqrt(head_dim), dim=-1)
    context = (weights @ values).transpose(1, 2).reshape(batch, n_tokens, emb_dim)
    return att.out_proj(context)


def test_sdpa_attention_equals_explicit_masked_softmax() -> None:
    torch.manual_seed(0)
    att = MultiHeadAttention(GPTConfig(**{**TINY.to_dict(), "qkv_bias": True})).eval()
    x = torch.randn(2, 9, TINY.emb_dim)
    torch.testing.assert_close(att(x), explicit_attention(att, x), rtol=1e-5, atol=1e-6)


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % TINY.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
        assert not torch.allclose(model(idx)[:, 6:], model(changed)[:, 6:])


def test_kv_cache_gives_the_same_logits_as_a_full_forward() -> None:
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.context_length))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :5], cache), model(idx[:, 5:6], cache), model(idx[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_positions_past_the_context_are_refused() -> None:
    model = GPTModel(TINY)
    with pytest.raises(ValueError, match="context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "drop_rate": 0.5}))
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_head_dim_is_derived() -> None:
    assert TINY.head_dim == 8
    assert MultiHeadAttention(TINY).head_dim == 8


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"emb_dim": 100, "n_heads": 12}, ["emb_dim=100", "n_heads=12", "divisible"]),
        ({"context_length": 0}, ["context_length=0", "positive"]),
        ({"n_layers": -1}, ["n_layers=-1"]),
        ({"drop_rate": 1.5}, ["drop_rate=1.5", "[0, 1)"]),
        ({"arch": "rnn"}, ["arch='rnn'", "bigram"]),
    ],
)
def test_bad_model_config_is_a_clear_error(change: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        GPTConfig(**{**TINY.to_dict(), **change})
    for word in words:
        assert word in str(err.value)
