"""A gptlab checkpoint as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline: the transformers architecture that computes what
the model's recipe does (`GPT2LMHeadModel`, `LlamaForCausalLM` or `Qwen3ForCausalLM`) as
safetensors weights, config.json, generation_config.json, the tokenizer's files and a model
card (README.md).

GPT-2's weights go through `gptlab.model.pretrained`'s table of GPT-2 names, the one that reads
GPT-2 weights, in the other direction. The folder is written under a temporary name beside
`out` and renamed into place at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptlab.atomic import sync_directory, temporary_path
from gptlab.errors import ConfigError, StorageError
from gptlab.export.model_card import MODEL_CARD_FILE, model_card
from gptlab.export.tokenizer import write_tokenizer
from gptlab.inference.loading import load_checkpoint
from gptlab.model.gpt import NORM_EPS, GPTConfig
from gptlab.model.pretrained import (
    GPT2_BLOCK_CONV1D,
    GPT2_BLOCK_NORMS,
    GPT2_FIXED,
    GPT2_FUSED_QKV,
    GPT2_NAMES,
    GPTMODEL_QKV,
    conv1d_layout,
)
from gptlab.model.tokenizers import Tokenizer
from gptlab.training.checkpoints import (
    LAYOUT_FIELDS,
    TRAINING_ONLY_FIELDS,
    find_best_checkpoint,
    find_last_checkpoint,
)

if TYPE_CHECKING:
    import transformers


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A transformers model class gptlab-export writes and the GPTConfig recipe it computes.

    `recipe`: switches with the value this architecture has; `expressed`: fields it takes at
    any value (sizes, layout, training-only). Every other field must hold its default, the
    classic GPT-2 that a field added later switches away from, so a new switch is refused
    until someone maps it.
    """

    name: str  # in messages
    model_class: str  # the transformers class, written to config.json's `architectures`
    config_class: str
    model_type: str  # config.json's `model_type`, a tag of the model card
    recipe: dict[str, Any]
    expressed: tuple[str, ...]

    def required(self, field: dataclasses.Field) -> Any:
        return self.recipe.get(field.name, field.default)

    def lacks(self, config: GPTConfig) -> list[str]:
        """`config`'s settings this architecture has no equivalent for, with its value."""
        return [
            f"model.{field.name}={getattr(config, field.name)!r} "
            f"({self.name}: {self.required(field)!r})"
            for field in dataclasses.fields(config)
            if field.name not in self.expressed
            and getattr(config, field.name) != self.required(field)
        ]

    def describe(self) -> str:
        switches = ", ".join(f"{key}={override(value)}" for key, value in self.recipe.items())
        return f"{self.model_class} ({switches or 'every switch at its GPT-2 default'})"


def override(value: Any) -> str:
    """`value` as a Hydra override writes it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


SIZE_FIELDS = ("vocab_size", "emb_dim", "n_heads", "n_layers")
GPT2 = Architecture(
    "GPT-2",
    "GPT2LMHeadModel",
    "GPT2Config",
    "gpt2",
    {},
    (*SIZE_FIELDS, *LAYOUT_FIELDS, "qkv_bias", "gelu_approximate", *TRAINING_ONLY_FIELDS),
)
# Llama: RoPE with halves rotated (GPTModel's `rotate`, HF's `rotate_half`), RMSNorm, SwiGLU
# and no biases.
LLAMA_RECIPE = {
    "pos_emb": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "bias": False,
    "qkv_bias": False,
    "qk_norm": False,
}
# gelu_approximate only acts under mlp=gelu, which neither has.
LLAMA_FIELDS = (
    *SIZE_FIELDS,
    *LAYOUT_FIELDS,
    "rope_base",
    "mlp_hidden",
    "gelu_approximate",
    *TRAINING_ONLY_FIELDS,
)
LLAMA = Architecture(
    "Llama", "LlamaForCausalLM", "LlamaConfig", "llama", LLAMA_RECIPE, LLAMA_FIELDS
)
# Qwen3 is Llama with each head's queries and keys RMS-normed before RoPE, as qk_norm does.
QWEN3 = Architecture(
    "Qwen3",
    "Qwen3ForCausalLM",
    "Qwen3Config",
    "qwen3",
    {**LLAMA_RECIPE, "qk_norm": True},
    LLAMA_FIELDS,
)
# In order of preference where a config misses them all by as many settings.
ARCHITECTURES = (GPT2, LLAMA, QWEN3)
# transformers' names for the GELU GPTModel's FeedForward runs, by `gelu_approximate`.
GPT2_ACTIVATIONS = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
# Llama's and Qwen3's tensor names and GPTModel's, all without bias; the head and embedding
# lose the padded vocabulary rows.
LLAMA_NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "out_head.weight",
}
# Inside block `model.layers.<i>.` (GPTModel: `trf_blocks.<i>.`), `.weight` of each.
LLAMA_BLOCK = {
    "input_layernorm": "norm1",
    "self_attn.q_proj": "att.W_query",
    "self_attn.k_proj": "att.W_key",
    "self_attn.v_proj": "att.W_value",
    "self_attn.o_proj": "att.out_proj",
    "post_attention_layernorm": "norm2",
    "mlp.down_proj": "ff.layers.2",
}
QWEN3_BLOCK = {"self_attn.q_norm": "att.q_norm", "self_attn.k_norm": "att.k_norm"}
# SwiGLU's up-projection: gate rows first, then value rows (GPTModel's `SwiGLU` chunks it so).
SWIGLU_FUSED = "ff.layers.0"
SWIGLU_HALVES = ("mlp.gate_proj", "mlp.up_proj")


def export_checkpoint(ckpt: str | None, out: str | None, log_dir: str | Path) -> Path:
    """Write checkpoint `ckpt` (a path, `last` or `best` under `log_dir`) as a Hugging Face
    folder at `out`, which must be new or empty; returns the folder."""
    target = check_out(out)
    require_transformers()
    path = checkpoint_path(ckpt, log_dir)
    module = load_checkpoint(path)
    architecture = check_exportable(module.config, str(path))
    with staged_folder(target) as folder:
        state = module.model.state_dict()
        n_parameters = write_model(state, module.config, module.tokenizer, folder, architecture)
        write_tokenizer(module.tokenizer, module.config.context_length, folder)
        card = model_card(
            path,
            module.hparams,
            module.tokenizer,
            n_parameters,
            str(out),
            architecture.model_class,
            architecture.model_type,
        )
        (folder / MODEL_CARD_FILE).write_text(card)
    return target


def check_out(out: str | None) -> Path:
    """The folder to write: new, or an empty folder."""
    if not out:
        raise ConfigError(
            "gptlab-export needs out=<folder> for the Hugging Face files, a new or empty "
            "folder, e.g. out=exports/my-gpt."
        )
    target = Path(str(out)).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={out!r} is a file: give a new or empty folder for the export.")
    if target.is_dir():
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            held = ", ".join(repr(name) for name in entries[:3]) + (", ..." * (len(entries) > 3))
            raise ConfigError(
                f"out={out!r} is a folder that is not empty (it holds {held}): the export would "
                f"mix its files with those. Give a new or empty folder, e.g. "
                f"out={str(out).rstrip('/')}-2, or remove that one first."
            )
    return target


def require_transformers() -> None:
    """transformers writes the folder (and so matches what loads it): say how to install it."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"gptlab-export writes the model with Hugging Face transformers, which cannot be "
            f"imported ({err}): pip install transformers, then run the export again."
        ) from None


def checkpoint_path(ckpt: str | None, log_dir: str | Path) -> Path:
    """The checkpoint `ckpt=` names: a path, or `last` / `best` of the newest run."""
    if not ckpt:
        raise ConfigError(
            "gptlab-export needs ckpt=<path to a .ckpt>, ckpt=last (the newest run's last.ckpt) "
            "or ckpt=best (its best by val loss)."
        )
    finders = {"last": find_last_checkpoint, "best": find_best_checkpoint}
    return finders[ckpt](log_dir) if ckpt in finders else Path(str(ckpt)).expanduser()


def check_exportable(config: GPTConfig, ckpt: str) -> Architecture:
    """The architecture that computes checkpoint `ckpt`'s model; where none does, refuse,
    naming the settings that the nearest one has no equivalent for."""
    lacking = [(architecture, architecture.lacks(config)) for architecture in ARCHITECTURES]
    nearest, lacks = min(lacking, key=lambda pair: len(pair[1]))  # the first of a tie
    if not lacks:
        return nearest
    written = ", ".join(architecture.describe() for architecture in ARCHITECTURES)
    raise ConfigError(
        f"ckpt={ckpt!r} has {', '.join(lacks)}, which {nearest.name} in Hugging "
        f"Face transformers ({nearest.model_class}), the nearest architecture gptlab-export "
        f"writes, has no equivalent for. gptlab-export writes {written}: export a model "
        f"trained with one of these recipes."
    )


def gpt2_config_for(config: GPTConfig, eot_id: int | None) -> transformers.GPT2Config:
    """GPT2Config for `config`: its sizes, context (n_positions) and dropout."""
    import transformers

    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        activation_function=GPT2_ACTIVATIONS[config.gelu_approximate],
        resid_pdrop=config.drop_rate,
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        tie_word_embeddings=config.tie_weights,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        **GPT2_FIXED,
    )


def to_gpt2_names(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict from GPTModel's: the inverse of `to_gptmodel_names`, with
    the padded vocabulary rows dropped and zero qkv biases where GPTModel has none."""
    hf = {name: state[ours] for name, ours in GPT2_NAMES.items()}
    hf["wte.weight"] = hf["wte.weight"][: config.vocab_size]
    for i in range(config.n_layers):
        h, ours = f"h.{i}.", f"trf_blocks.{i}."
        for part in ("weight", "bias"):
            for name, our_name in GPT2_BLOCK_NORMS.items():
                hf[f"{h}{name}.{part}"] = state[f"{ours}{our_name}.{part}"]
            for name, our_name in GPT2_BLOCK_CONV1D.items():
                hf[f"{h}{name}.{part}"] = conv1d_layout(state[f"{ours}{our_name}.{part}"])
            if part == "bias" and not config.qkv_bias:
                # GPT-2's attention always adds a bias; zero adds nothing.
                fused = torch.zeros(3 * config.emb_dim)
            else:
                fused = torch.cat([state[f"{ours}{name}.{part}"] for name in GPTMODEL_QKV])
            hf[f"{h}{GPT2_FUSED_QKV}.{part}"] = conv1d_layout(fused)
    named = {f"transformer.{name}": tensor for name, tensor in hf.items()}
    named["lm_head.weight"] = state["out_head.weight"][: config.vocab_size]
    return {name: tensor.detach().float().contiguous() for name, tensor in named.items()}


def llama_config_for(
    config: GPTConfig, eot_id: int | None, architecture: Architecture
) -> transformers.PreTrainedConfig:
    """LlamaConfig or Qwen3Config for `config`: its sizes, context, RoPE base and norm eps.
    Neither has residual dropout, so drop_rate, which only training uses, is left out."""
    import transformers

    return getattr(transformers, architecture.config_class)(
        vocab_size=config.vocab_size,
        hidden_size=config.emb_dim,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.context_length,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_base)},
        attention_bias=False,
        tie_word_embeddings=config.tie_weights,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )


def to_llama_names(
    state: dict[str, torch.Tensor], config: GPTConfig, architecture: Architecture
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's (or Qwen3ForCausalLM's) state dict from GPTModel's: the padded
    vocabulary rows dropped and SwiGLU's fused up-projection split into gate and up."""
    hf = {name: state[ours] for name, ours in LLAMA_NAMES.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        hf[name] = hf[name][: config.vocab_size]
    block_names = {**LLAMA_BLOCK, **(QWEN3_BLOCK if architecture is QWEN3 else {})}
    for i in range(config.n_layers):
        layer, ours = f"model.layers.{i}.", f"trf_blocks.{i}."
        for name, our_name in block_names.items():
            hf[f"{layer}{name}.weight"] = state[f"{ours}{our_name}.weight"]
        halves = state[f"{ours}{SWIGLU_FUSED}.weight"].chunk(2, dim=0)
        for name, half in zip(SWIGLU_HALVES, halves, strict=True):
            hf[f"{layer}{name}.weight"] = half
    return {name: tensor.detach().float().contiguous() for name, tensor in hf.items()}


def hf_model_for(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    eot_id: int | None,
    architecture: Architecture,
) -> transformers.PreTrainedModel:
    """`architecture`'s transformers model holding GPTModel weights `state`."""
    import transformers

    if architecture is GPT2:
        hf_config, weights = gpt2_config_for(config, eot_id), to_gpt2_names(state, config)
    else:
        hf_config = llama_config_for(config, eot_id, architecture)
        weights = to_llama_names(state, config, architecture)
    # Built on the meta device, so no weights are initialised only to be replaced.
    with torch.device("meta"):
        model = getattr(transformers, architecture.model_class)(hf_config)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()  # one tensor for embedding and head when tie_word_embeddings
    return model


def write_model(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: Tokenizer,
    folder: Path,
    architecture: Architecture,
) -> int:
    """Save GPTModel weights `state` as `architecture` into `folder`; returns its number of
    parameters (a tied head counted once)."""
    from transformers.utils import logging as hf_logging

    model = hf_model_for(state, config, tokenizer.eot_id, architecture)
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
    return model.num_parameters()


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A new folder beside `target` to write into, renamed to `target` when the block ends
    and removed, with any parent folders made for it, when the block fails."""
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    staging = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export of this pid
        staging.mkdir()
        yield staging
        os.replace(staging, target)  # onto nothing, or onto an empty folder
        sync_directory(target.parent)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise StorageError(
                f"Could not write the export to {target} ({type(err).__name__}: {err}); "
                f"nothing was left there. Free some space or give another out=<folder>."
            ) from None
        raise
