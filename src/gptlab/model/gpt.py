"""The GPT-2 model of the seed notebooks, in plain PyTorch, with switches for later ideas.

Reads top to bottom like the notebooks: config, attention, feed-forward, block, model.
Parameter names follow the seed (`tok_emb`, `trf_blocks`, `W_query`, ...) so that code
written against the book keeps working. No Lightning, Hydra or tokenizer imports here.

Each switch (`pos_emb`, `norm`, `qk_norm`, `mlp`, `bias`, `logit_softcap`, `zero_init_proj`)
defaults to GPT-2's choice, so a default model has GPT-2's parameters, names and outputs;
they combine freely.
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

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2", "swiglu")
# torch's `approximate` argument of the GELU: GPT-2's tanh form, or the exact erf form.
GELU_APPROXIMATIONS = ("tanh", "none")
# GPT-2's layer_norm_epsilon, for RMSNorm too (torch's default there, the dtype's machine
# epsilon, is 8e-3 in bf16).
NORM_EPS = 1e-5
# swiglu's default hidden width is rounded to a multiple of this (tensor-core friendly shapes).
SWIGLU_MULTIPLE = 8


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
    # "learned": GPT-2's position embedding table; "rope": rotary embeddings of q and k
    # (RoFormer, Su et al. 2021; Llama), no table.
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0  # RoPE's base wavelength (RoFormer's 10000)
    # Block and final norms: GPT-2's LayerNorm, or RMSNorm (Zhang & Sennrich 2019; Llama).
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    # Normalise queries and keys per head (with `norm`'s kind) before RoPE, as modded-nanogpt
    # and Gemma 3 do (OLMo 2 over all heads at once): attention logits cannot blow up.
    qk_norm: bool = False
    # "gelu": GPT-2's tanh GELU; "relu2": ReLU squared (Primer, So et al. 2021; modded-nanogpt);
    # "swiglu": a SiLU-gated unit (Shazeer 2020; Llama).
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    # Under mlp=gelu: "tanh", GPT-2's approximation (its weights need it), or "none", the exact
    # erf GELU of nanoGPT's nn.GELU(), whose CPU kernel takes half the time.
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    mlp_hidden: int | None = None  # the MLP's hidden width; null: see `mlp_width`
    # Biases of the linear layers other than q/k/v (those follow qkv_bias) and of the norms.
    bias: bool = True
    # c: logits = c * tanh(logits / c), so no logit exceeds c (Gemma 2; modded-nanogpt).
    logit_softcap: float | None = None
    # Under init=gpt2: each block's attention and MLP output projections start at zero, so
    # every block starts as the identity (modded-nanogpt, muP-style); an error with init=torch.
    zero_init_proj: bool = False

    def __post_init__(self) -> None:
        check_config(asdict(self))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to `pad_vocab_multiple`."""
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: `mlp_hidden`, or else GPT-2's 4 x emb_dim; for swiglu,
        whose gate adds a third matrix, 2/3 of that to the nearest multiple of
        SWIGLU_MULTIPLE, so its weights number (about) the same as GPT-2's MLP's."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return SWIGLU_MULTIPLE * round(8 * self.emb_dim / 3 / SWIGLU_MULTIPLE)
        return 4 * self.emb_dim

    def to_dict(self) -> dict:
        return asdict(self)


def check_choice(values: dict[str, Any], key: str, options: tuple[str, ...]) -> None:
    """`values[key]` must be one of `options`; the error names them all."""
    if values[key] not in options:
        choices = ", ".join(repr(option) for option in options[:-1])
        raise ConfigError(
            f"model.{key}={values[key]!r} is unknown: use {choices} or {options[-1]!r}."
        )


def check_config(values: dict[str, Any]) -> None:
    """GPTConfig's ranges and the rule across its keys, on its field values; `vocab_size` may
    still be None, to follow a tokenizer that the corpus builds."""
    check_choice(values, "arch", ("gpt", "bigram"))
    check_choice(values, "init", ("gpt2", "torch"))
    check_choice(values, "pos_emb", POS_EMBS)
    check_choice(values, "norm", NORMS)
    check_choice(values, "mlp", MLPS)
    check_choice(values, "gelu_approximate", GELU_APPROXIMATIONS)
    for key in ("tie_weights", "qk_norm", "bias", "zero_init_proj"):
        if not isinstance(values[key], bool):
            raise ConfigError(f"model.{key}={values[key]!r} must be true or false.")
    counts = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    for key in (*counts, "pad_vocab_multiple", "mlp_hidden"):
        value = values[key]
        if key in ("vocab_size", "mlp_hidden") and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}={value!r} must be a positive integer.")
    if not 0.0 <= values["drop_rate"] < 1.0:
        raise ConfigError(
            f"model.drop_rate={values['drop_rate']!r} must be in [0, 1): 0.0 disables dropout."
        )
    for key, example in (("rope_base", "10000.0"), ("logit_softcap", "30.0, or null for none")):
        value = values[key]
        if key == "logit_softcap" and value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ConfigError(f"model.{key}={value!r} must be a positive number, e.g. {example}.")
    emb_dim, n_heads = values["emb_dim"], values["n_heads"]
    if emb_dim % n_heads:
        raise ConfigError(
            f"model.emb_dim={emb_dim} is not divisible by model.n_heads={n_heads}: each head "
            f"gets emb_dim / n_heads dimensions, so choose emb_dim as a multiple of n_heads "
            f"(e.g. {emb_dim - emb_dim % n_heads}) or n_heads as a divisor of emb_dim."
        )
    if values["pos_emb"] == "rope" and (emb_dim // n_heads) % 2:
        raise ConfigError(
            f"model.pos_emb=rope rotates pairs of dimensions, but a head of "
            f"emb_dim / n_heads = {emb_dim} / {n_heads} = {emb_dim // n_heads} dimensions is "
            f"odd: choose model.emb_dim and model.n_heads for an even head size, or "
            f"model.pos_emb=learned."
        )
    if values["zero_init_proj"] and values["init"] != "gpt2":
        raise ConfigError(
            f"model.zero_init_proj=true replaces a step of GPT-2's init, but "
            f"model.init={values['init']!r} keeps PyTorch's default init: set model.init=gpt2, "
            f"or model.zero_init_proj=false."
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


def build_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The norm `config.norm` names over the last `dim` features (RMSNorm has no bias)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=config.bias)


def rope_angles(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (context_length, head_dim / 2) of RoPE's angles: position p turns the
    pair i by p * rope_base^(-2i / head_dim)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    frequencies = config.rope_base**-exponents
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, heads, tokens, head_dim): dimensions i and i + head_dim/2 form a pair,
    turned by its position's angle (the half-split layout of GPT-NeoX and Hugging Face's
    Llama)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


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
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim, bias=config.bias)
        self.q_norm = build_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = build_norm(config, self.head_dim) if config.qk_norm else nn.Identity()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        return x.view(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`rope`: cos and sin of these tokens' positions, under pos_emb=rope."""
        batch, n_tokens, emb_dim = x.shape
        queries = self.q_norm(self._split_heads(self.W_query(x)))
        keys = self.k_norm(self._split_heads(self.W_key(x)))
        values = self._split_heads(self.W_value(x))
        if rope is not None:
            # Before the cache: cached keys keep the rotation of their own positions.
            queries, keys = rotate(queries, *rope), rotate(keys, *rope)
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


class ReLUSquared(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021), the MLP activation of modded-nanogpt."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """silu(gate) * value, the gate being the first half of the features and the value the
    second (Shazeer 2020), so one matmul computes both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


def build_activation(config: GPTConfig) -> nn.Module:
    """The MLP's nonlinearity `config.mlp` names (swiglu's gate takes two halves of its input)."""
    if config.mlp == "gelu":
        return nn.GELU(approximate=config.gelu_approximate)
    return ReLUSquared() if config.mlp == "relu2" else SwiGLU()


class FeedForward(nn.Module):
    """Position-wise MLP: up-projection, activation, down-projection (`layers[2]`).

    GPT-2's is 4x wide with the tanh GELU; swiglu's up-projection is twice `mlp_width` wide,
    gate and value side by side.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_width
        up_width = 2 * hidden if config.mlp == "swiglu" else hidden
        self.layers = nn.Sequential(
            nn.Linear(config.emb_dim, up_width, bias=config.bias),
            build_activation(config),
            nn.Linear(hidden, config.emb_dim, bias=config.bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(att(norm(x))), then x + drop(ff(norm(x)))."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = build_norm(config, config.emb_dim)
        self.att = MultiHeadAttention(config, layer)
        self.norm2 = build_norm(config, config.emb_dim)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, rope))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` blocks, final norm, linear head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.emb_dim)
        if config.pos_emb == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        else:
            # Derived from the config, so not saved: checkpoints hold only learned weights.
            cos, sin = rope_angles(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(
            TransformerBlock(config, layer) for layer in range(config.n_layers)
        )
        self.final_norm = build_norm(config, config.emb_dim)
        self.out_head = nn.Linear(config.emb_dim, config.padded_vocab_size, bias=False)
        # Recompute each block's activations in the backward (less memory, more compute).
        self.checkpoint_activations = False
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if config.init == "gpt2":
            self._init_gpt2()

    def _init_gpt2(self) -> None:
        """GPT-2's init. Each residual branch adds to the stream's variance, so the last
        projection of each (two per block) is scaled down by sqrt(2 n_layers), or starts
        at zero under zero_init_proj."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.trf_blocks:
            for projection in (block.att.out_proj, block.ff.layers[2]):
                if self.config.zero_init_proj:
                    nn.init.zeros_(projection.weight)
                else:
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
        end = start + n_tokens
        if end > self.config.context_length:
            raise ValueError(
                f"{end} positions exceed context_length={self.config.context_length}: "
                f"crop the input to the last {self.config.context_length} tokens."
            )
        x = self.tok_emb(idx)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.pos_emb(torch.arange(start, end, device=idx.device))
        else:
            rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        x = self.drop_emb(x)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks:
            if recompute:
                x = checkpoint(block, x, None, rope, use_reentrant=False)
            else:
                x = block(x, cache, rope)
        if cache is not None:
            cache.length += n_tokens
        logits = self.out_head(self.final_norm(x))
        if self.config.logit_softcap is not None:
            # In fp32 at least: bf16's 3 digits of tanh would move logits by ~0.1 at c=30.
            cap = self.config.logit_softcap
            dtype = torch.promote_types(logits.dtype, torch.float32)
            logits = cap * torch.tanh(logits.to(dtype) / cap)
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
