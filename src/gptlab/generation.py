"""Text generation: greedy or sampled decoding, with a KV cache and context cropping."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gptlab.errors import ConfigError
from gptlab.tokenizers import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; an empty prompt starts from `<|endoftext|>` where there is one."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot_id is None:
        raise ConfigError(
            f"An empty prompt needs a start token and the {tokenizer.name} tokenizer has none: "
            f"give prompt=<some text>."
        )
    return [tokenizer.eot_id]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject decoding settings that would silently do something else."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is negative: use 0 for greedy, or > 0.")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1, or null to disable it.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1], or null to disable it.")


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of `logits` (batch, vocab): argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new token column (batch,) as soon as it is chosen.

    The model sees at most the last `context_length` tokens, as in the seed's
    `generate_text_simple`. The KV cache holds absolute positions, so once a sequence
    outgrows the context the window is recomputed in full each step: slower, never wrong.
    Rows that produced `eos_id` keep emitting it; decoding stops when all rows have.
    """
    check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache() if use_cache else None
        logits = model(idx[:, -context_length:], cache)[:, -1]
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            yield token
            if eos_id is not None and bool(finished.all()):
                return
            idx = torch.cat([idx, token[:, None]], dim=1)
            if cache is not None and cache.length < context_length:
                logits = model(token[:, None], cache)[:, -1]
            else:
                cache = None
                logits = model(idx[:, -context_length:])[:, -1]
    finally:
        model.train(was_training)


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """`idx` (batch, tokens) followed by up to `max_new_tokens` generated tokens."""
    new = list(stream_tokens(model, idx, max_new_tokens, **options))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
