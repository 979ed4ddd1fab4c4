"""Text generation: greedy or sampled decoding, with a KV cache and context cropping."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from gptlab.errors import ConfigError
from gptlab.model.tokenizers import Tokenizer, UnknownCharacters


def encode_prompt(tokenizer: Tokenizer, prompt: str, key: str = "prompt") -> list[int]:
    """Prompt token ids; an empty prompt starts from `<|endoftext|>` where there is one.

    `key` names the setting the prompt came from, for errors.
    """
    if not prompt:
        if tokenizer.eot_id is None:
            raise ConfigError(
                f"An empty {key} needs a start token and the {tokenizer.name} tokenizer has "
                f"none: give {key}=<some text>."
            )
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode(prompt)
    except UnknownCharacters as err:
        kept = "".join(c for c in prompt if c not in err.characters)
        lowered = prompt.lower()
        suggestion = lowered if not set(lowered) & set(err.characters) and lowered else kept
        raise ConfigError(
            f"{key}={prompt!r} has characters {err.characters!r} that this char model's "
            f"vocabulary lacks (it holds the {tokenizer.vocab_size} characters of its training "
            f"corpus): give a {key} made of the corpus's characters, e.g. "
            f"'{key}={suggestion!r}'."
        ) from None


def check_sampling(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int = 0,
    num_samples: int = 1,
    prefix: str = "",
) -> None:
    """Reject decoding settings that would silently do something else; `prefix` is where the
    keys live in the config (`callbacks.sample_text.` for the training samples)."""
    if isinstance(temperature, bool) or not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0
    ):
        raise ConfigError(
            f"{prefix}temperature={temperature!r} must be a number >= 0: use 0 for greedy "
            f"decoding, or e.g. 0.8 to sample."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(
            f"{prefix}top_k={top_k!r} must be an integer >= 1, or null to disable it."
        )
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0
    ):
        raise ConfigError(
            f"{prefix}top_p={top_p!r} must be in (0, 1], e.g. 0.9, or null to disable it."
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ConfigError(f"{prefix}max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"{prefix}num_samples={num_samples!r} must be an integer >= 1.")


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of `logits` (batch, vocab): argmax at temperature 0.

    Otherwise sample from softmax(logits / temperature), restricted to the `top_k` best
    tokens and then to the smallest set of best tokens whose probability reaches `top_p`.
    """
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


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` for repeatable sampling, or None to use torch's global one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new token column (batch,) as soon as it is chosen.

    The model sees at most the last `context_length` tokens (default: the model's), as in
    the seed's `generate_text_simple`. The KV cache holds absolute positions, so once a
    sequence outgrows the context the window is recomputed in full each step: slower,
    never wrong. Rows that produced `eos_id` keep emitting it; decoding stops when all
    rows have. `seed` makes sampling repeatable unless a `generator` is given.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    context_length = context_length or model.config.context_length
    if idx.shape[1] > context_length:
        warnings.warn(
            f"The prompt has {idx.shape[1]} tokens, more than context_length={context_length}: "
            f"it is cropped to its last {context_length} tokens.",
            stacklevel=2,
        )
    if max_new_tokens == 0:
        return
    generator = generator or seeded_generator(seed, idx.device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache() if use_cache else None
        logits = model(idx[:, -context_length:], cache)[:, -1]
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            yield token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            idx = torch.cat([idx, token[:, None]], dim=1)
            if cache is not None and cache.length < context_length:
                logits = model(token[:, None], cache)[:, -1]
            else:
                cache = None
                logits = model(idx[:, -context_length:])[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_samples: int = 1,
    **options,
) -> torch.Tensor:
    """`idx` (batch, tokens) followed by up to `max_new_tokens` generated tokens.

    Each prompt row is repeated `num_samples` times (adjacent rows), so one batch holds
    several prompts and several samples of each. `options` are those of `stream_tokens`.
    """
    check_sampling(
        options.get("temperature", 0.0),
        options.get("top_k"),
        options.get("top_p"),
        max_new_tokens,
        num_samples,
    )
    idx = idx.repeat_interleave(num_samples, dim=0)
    new = list(stream_tokens(model, idx, max_new_tokens, **options))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def continue_prompt(
    model: nn.Module, prompt: list[int], max_new_tokens: int, **options: Any
) -> list[int]:
    """One prompt's ids followed by its continuation, generated on the model's own device."""
    device = next(model.parameters()).device
    return generate(model, torch.tensor([prompt], device=device), max_new_tokens, **options)[
        0
    ].tolist()


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Decoded text as tokens arrive, held back while a character is still incomplete.

    One BPE token can end inside a multi-byte character, which decodes to U+FFFD until
    the next token completes it, so the text is re-decoded and only new text is yielded.
    """
    ids: list[int] = []
    shown = 0
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[shown:]
        shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]


@torch.no_grad()
def generate_text_simple(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """The seed notebooks' greedy loop: the whole cropped context at every step, no cache.

    Kept as the reference that `generate` is tested and benchmarked against.
    """
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        idx_next = torch.argmax(torch.softmax(logits, dim=-1), dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
