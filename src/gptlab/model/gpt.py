"""The GPT-2 model of the seed notebooks, in plain PyTorch.

Reads top to bottom like the notebooks: config, attention, feed-forward, block, model.
Parameter names follow the seed (`tok_emb`, `trf_blocks`, `W_query`, ...) so that code
written against the book keeps working. No Lightning, Hydra or tokenizer imports here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptlab.errors import ConfigError


@dataclass
class GPTConfig:
    """Model hyperparameters, with the seed's key names (`GPT_CONFIG_124M`)."""

    vocab_size: int
    context_length: int
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    arch: Literal["gpt", "bigram"] = "gpt"
    # Share the token embedding with the output head (GPT-2 does; the seed's 124M count does not).
    tie_weights: bool = False
    # Round the embedding/head rows up to a multiple of this (64: 50257 -> 50304) so matmuls
    # hit fast kernel shapes; the extra logits are sliced off before anyone sees them.
    pad_vocab_multiple: int = 1
    # "gpt2": normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers);
    # "torch": PyTorch's default layer init, as in the seed notebooks.
    init: Literal["gpt2", "torch"] = "gpt2"

    def __post_init__(self) -> None:
        check_config(asdict(self))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to `pad_vocab_multiple`."""
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)


def check_config(values: dict[str, Any]) -> None:
    """GPTConfig's ranges and the rule across its keys, on its field values; `vocab_size` may
    still be None, to follow a tokenizer that the corpus builds."""
    if values["arch"] not in ("gpt", "bigram"):
        raise ConfigError(f"model.arch={values['arch']!r} is unknown: use 'gpt' or 'bigram'.")
    if values["init"] not in ("gpt2", "torch"):
        raise ConfigError(f"model.init={values['init']!r} is unknown: use 'gpt2' or 'torch'.")
    if not isinstance(values["tie_weights"], bool):
        raise ConfigError(f"model.tie_weights={values['tie_weights']!r} must be true or false.")
    counts = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    for key in (*counts, "pad_vocab_multiple"):
        value = values[key]
        if key == "vocab_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}={value!r} must be a positive integer.")
    if not 0.0 <= values["drop_rate"] < 1.0:
        raise ConfigError(
            f"model.drop_rate={values['drop_rate']!r} must be in [0, 1): 0.0 disables dropout."
        )
    emb_dim, n_heads = values["emb_dim"], values["n_heads"]
    if emb_dim % n_heads:
        raise ConfigError(
            f"model.emb_dim={emb_dim} is not divisible by model.n_heads={n_heads}: each head "
            f"gets emb_dim / n_heads dimensions, so choose emb_dim as a multiple of n_heads "
            f"(e.g. {emb_dim - emb_dim % n_heads}) or n_heads as a divisor of emb_dim."
        )


class KVCache:
    """Keys and values of the positions already decoded, so each new token costs one position.

    Buffers are allocated on first use with room for `max_len` positions, so decoding
    appends in place instead of concatenating tensors at every step.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (batch, heads, new, head_dim); return all so far."""
        if self._keys[layer] is None:
            shape = (*keys.shape[:2], self.max_len, keys.shape[-1])
            self._keys[layer] = keys.new_zeros(shape)
            self._values[layer] = values.new_zeros(shape)
        end = self.length + keys.shape[2]
        cached_keys, cached_values = self._keys[layer], self._values[layer]
        cached_keys[:, :, self.length : end] = keys
        cached_values[:, :, self.length : end] = values
        return cached_keys[:, :, :end], cached_values[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention computed by PyTorch's fused SDPA kernel."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.drop_rate = config.drop_rate
        self.W_query = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.W_key = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.W_value = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        return x.view(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, n_tokens, emb_dim = x.shape
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        past = 0
        if cache is not None:
            past = cache.length
            keys, values = cache.update(self.layer, keys, values)
        mask = None
        if past and n_tokens > 1:
            # New queries sit at the end of a longer key sequence; SDPA's is_causal aligns
            # them to the start, so spell the causal mask out.
            mask = torch.ones(n_tokens, past + n_tokens, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=past)
        context = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            dropout_p=self.drop_rate if self.training else 0.0,
            is_causal=past == 0 and n_tokens > 1,
        )
        context = context.transpose(1, 2).reshape(batch, n_tokens, emb_dim)
        return self.out_proj(context)


class FeedForward(nn.Module):
    """Position-wise MLP, 4x wide, with GPT-2's tanh-approximated GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.emb_dim, 4 * config.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * config.emb_dim, config.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm(x))), then x + drop(ff(norm(x)))."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim)
        self.att = MultiHeadAttention(config, layer)
        self.norm2 = nn.LayerNorm(config.emb_dim)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` blocks, final norm, linear head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(
            TransformerBlock(config, layer) for layer in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(config.emb_dim)
        self.out_head = nn.Linear(config.emb_dim, config.padded_vocab_size, bias=False)
        # Recompute each block's activations in the backward (less memory, more compute).
        self.checkpoint_activations = False
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if config.init == "gpt2":
            self._init_gpt2()

    def _init_gpt2(self) -> None:
        """GPT-2's init. Each residual branch adds to the stream's variance, so the last
        projection of each (two per block) is scaled down by sqrt(2 n_layers)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.trf_blocks:
            for projection in (block.att.out_proj, block.ff.layers[2]):
                nn.init.normal_(projection.weight, mean=0.0, std=residual_std)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers, self.config.context_length)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids (batch, tokens).

        With a cache, `idx` holds only the new tokens and positions continue after the
        cached ones; they must still fit in `context_length`.
        """
        n_tokens = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + n_tokens > self.config.context_length:
            raise ValueError(
                f"{start + n_tokens} positions exceed context_length={self.config.context_length}: "
                f"crop the input to the last {self.config.context_length} tokens."
            )
        positions = torch.arange(start, start + n_tokens, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, cache)
        if cache is not None:
            cache.length += n_tokens
        logits = self.out_head(self.final_norm(x))
        if self.config.padded_vocab_size == self.config.vocab_size:
            return logits
        # Padded rows are no tokens: their logits never reach the loss or a sampler.
        return logits[..., : self.config.vocab_size]


class BigramModel(nn.Module):
    """The seed's baseline: each token's logits for the next token are one table row."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_logits = nn.Embedding(config.vocab_size, config.vocab_size)

    def new_cache(self) -> None:
        """A bigram looks at one token only, so there is nothing to cache."""
        return None

    def forward(self, idx: torch.Tensor, cache: None = None) -> torch.Tensor:
        return self.token_logits(idx)


def build_model(config: GPTConfig) -> GPTModel | BigramModel:
    return BigramModel(config) if config.arch == "bigram" else GPTModel(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters, so a tied embedding/head counts once."""
    return sum(p.numel() for p in model.parameters())
