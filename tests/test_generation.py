"""generate(): greedy against the seed's loop, the KV cache, sampling controls, bad settings."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_tiktoken
from gptlab.errors import ConfigError
from gptlab.inference.generation import (
    check_sampling,
    encode_prompt,
    generate,
    generate_text_simple,
    next_token,
    stream_text,
    stream_tokens,
)
from gptlab.model.gpt import BigramModel, GPTConfig, GPTModel
from gptlab.model.tokenizers import CharTokenizer, GPT2Tokenizer

CONTEXT = 8


@pytest.fixture
def model() -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=50, context_length=CONTEXT, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0
    )
    return GPTModel(cfg).eval()


def test_greedy_equals_the_seed_loop(model: GPTModel) -> None:
    prompt = torch.tensor([[3, 14, 15]])
    expected = generate_text_simple(model, prompt, 3 * CONTEXT, CONTEXT)
    assert torch.equal(generate(model, prompt, 3 * CONTEXT), expected)


@pytest.mark.parametrize("prompt_length", [1, 5, CONTEXT])
def test_cache_gives_the_same_tokens_past_the_context(model: GPTModel, prompt_length) -> None:
    prompt = torch.randint(0, 50, (2, prompt_length), generator=torch.Generator().manual_seed(1))
    new_tokens = 3 * CONTEXT
    cached = generate(model, prompt, new_tokens, use_cache=True)
    uncached = generate(model, prompt, new_tokens, use_cache=False)
    assert cached.shape == (2, prompt_length + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, generate_text_simple(model, prompt, new_tokens, CONTEXT))


def test_cache_logits_match_a_full_forward(model: GPTModel) -> None:
    """Decoding one token at a time with the cache reproduces every position's logits."""
    idx = torch.randint(0, 50, (1, CONTEXT), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache()
    with torch.no_grad():
        stepwise = torch.cat([model(idx[:, i : i + 1], cache) for i in range(CONTEXT)], dim=1)
        full = model(idx)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_bigram_model_generates_without_a_cache() -> None:
    torch.manual_seed(0)
    bigram = BigramModel(GPTConfig(vocab_size=20, context_length=4, arch="bigram"))
    prompt = torch.tensor([[1, 2]])
    assert torch.equal(generate(bigram, prompt, 10), generate_text_simple(bigram, prompt, 10, 4))


def test_batched_prompts_match_one_at_a_time(model: GPTModel) -> None:
    prompts = torch.tensor([[1, 2, 3], [7, 8, 9], [40, 41, 42]])
    together = generate(model, prompts, 12)
    for row, prompt in enumerate(prompts):
        assert torch.equal(together[row], generate(model, prompt[None], 12)[0])


def test_num_samples_repeats_each_prompt(model: GPTModel) -> None:
    prompts = torch.tensor([[1, 2, 3], [7, 8, 9]])
    out = generate(model, prompts, 10, num_samples=3, temperature=1.0, seed=0)
    assert out.shape == (6, 13)
    assert torch.equal(out[:3, :3], prompts[0].expand(3, 3))
    assert torch.equal(out[3:, :3], prompts[1].expand(3, 3))
    assert len({tuple(row.tolist()) for row in out[:3]}) > 1, "samples of one prompt differ"


def test_seed_makes_sampling_repeatable(model: GPTModel) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    first = generate(model, prompt, 30, temperature=1.0, seed=7)
    assert torch.equal(first, generate(model, prompt, 30, temperature=1.0, seed=7))
    assert not torch.equal(first, generate(model, prompt, 30, temperature=1.0, seed=8))


def test_eos_stops_each_row_and_pads_finished_ones(model: GPTModel) -> None:
    prompts = torch.tensor([[1, 2, 3], [7, 8, 9]])
    free = generate(model, prompts, 20)[:, 3:]
    eos = int(free[0, 2])  # row 0 emits it at step 2 at the latest
    stopped = generate(model, prompts, 20, eos_id=eos)[:, 3:]
    first_eos = [
        (row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in free
    ]
    assert first_eos[0] <= 2
    ends = [20 if i is None else i + 1 for i in first_eos]
    assert stopped.shape[1] == max(ends), "decoding stops once every row has emitted eos"
    for row, end in enumerate(ends):
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos).all()


def test_zero_new_tokens_returns_the_prompt(model: GPTModel) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_long_prompt_is_cropped_with_a_warning(model: GPTModel) -> None:
    prompt = torch.arange(2 * CONTEXT)[None]
    with pytest.warns(UserWarning, match=f"cropped to its last {CONTEXT} tokens"):
        out = generate(model, prompt, 5)
    cropped = generate(model, prompt[:, -CONTEXT:], 5)
    assert torch.equal(out[:, -5:], cropped[:, -5:])


def test_generation_leaves_the_training_mode_alone(model: GPTModel) -> None:
    model.train()
    generate(model, torch.tensor([[1]]), 3)
    assert model.training


def sample_many(logits: torch.Tensor, n: int = 4000, **options) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return next_token(logits.expand(n, -1), generator=generator, **options)


def test_top_k_samples_only_the_k_best() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])
    assert set(sample_many(logits, temperature=1.0, top_k=3).tolist()) == {1, 3, 5}
    assert set(sample_many(logits, temperature=5.0, top_k=1).tolist()) == {1}


@pytest.mark.parametrize(
    ("top_p", "allowed"), [(0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, allowed: set[int]) -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert set(sample_many(logits, temperature=1.0, top_p=top_p).tolist()) == allowed


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature: float) -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    samples = sample_many(logits, n=20000, temperature=temperature)
    frequencies = torch.bincount(samples, minlength=4).float() / len(samples)
    expected = (logits[0] / temperature).softmax(dim=-1)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


def test_temperature_zero_is_argmax_whatever_the_filters() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9], [5.0, -1.0, 0.0]])
    assert next_token(logits, 0.0, top_k=2, top_p=0.1).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_settings_raise_config_errors(model: GPTModel, settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        generate(model, torch.tensor([[1]]), 5, **settings)


def test_negative_max_new_tokens_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens=-1"):
        check_sampling(1.0, None, None, max_new_tokens=-1)


def test_empty_prompt_needs_a_start_token() -> None:
    with pytest.raises(ConfigError, match="prompt="):
        encode_prompt(CharTokenizer("abc"), "")


@needs_tiktoken
def test_empty_prompt_starts_from_endoftext_with_bpe() -> None:
    assert encode_prompt(GPT2Tokenizer(), "") == [50256]


def test_unknown_characters_are_named() -> None:
    with pytest.raises(ConfigError, match="'é日'"):
        encode_prompt(CharTokenizer("abc "), "a bé日")


@needs_tiktoken
def test_stream_text_never_splits_a_character() -> None:
    tokenizer = GPT2Tokenizer()
    text = "Ünïcödé 日本語 done"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "some token is a partial char"
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_tokens_yields_one_column_per_step(model: GPTModel) -> None:
    steps = list(stream_tokens(model, torch.tensor([[1, 2], [3, 4]]), 4))
    assert [tuple(step.shape) for step in steps] == [(2,)] * 4
