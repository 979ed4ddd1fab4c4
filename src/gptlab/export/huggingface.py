"""A gptlab checkpoint as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline: `GPT2LMHeadModel` weights (safetensors),
config.json, generation_config.json, the tokenizer's files and a model card (README.md).

The weights go through `gptlab.model.pretrained`'s table of GPT-2 names, the one that reads
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
from typing import TYPE_CHECKING

import torch

from gptlab.atomic import sync_directory, temporary_path
from gptlab.errors import ConfigError, StorageError
from gptlab.export.model_card import MODEL_CARD_FILE, model_card
from gptlab.export.tokenizer import write_tokenizer
from gptlab.inference.loading import load_checkpoint
from gptlab.model.gpt import GPTConfig
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
    TRAINING_ONLY_FIELDS,
    find_best_checkpoint,
    find_last_checkpoint,
)

if TYPE_CHECKING:
    import transformers

# The GPTConfig fields GPT2Config expresses, and those that only say how training ran. Any
# other field must hold its default, the classic GPT-2 that a field added later switches away
# from, so a new switch is refused here until someone maps it.
GPT2_FIELDS = (
    *("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias"),
    *("tie_weights", "pad_vocab_multiple", "drop_rate"),
    *TRAINING_ONLY_FIELDS,
)
# PyTorch's tanh-approximated GELU, the kernel GPTModel's FeedForward runs.
GPT2_ACTIVATION = "gelu_pytorch_tanh"


def export_checkpoint(ckpt: str | None, out: str | None, log_dir: str | Path) -> Path:
    """Write checkpoint `ckpt` (a path, `last` or `best` under `log_dir`) as a Hugging Face
    folder at `out`, which must be new or empty; returns the folder."""
    target = check_out(out)
    require_transformers()
    path = checkpoint_path(ckpt, log_dir)
    module = load_checkpoint(path)
    check_exportable(module.config, str(path))
    with staged_folder(target) as folder:
        state = module.model.state_dict()
        n_parameters = write_model(state, module.config, module.tokenizer, folder)
        write_tokenizer(module.tokenizer, module.config.context_length, folder)
        card = model_card(path, module.hparams, module.tokenizer, n_parameters, str(out))
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


def check_exportable(config: GPTConfig, ckpt: str) -> None:
    """Refuse, naming them, the settings of checkpoint `ckpt` that GPT2LMHeadModel has no
    equivalent for."""
    found = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in GPT2_FIELDS and value != field.default:
            found.append(f"model.{field.name}={value!r} (GPT-2: {field.default!r})")
    if found:
        raise ConfigError(
            f"ckpt={ckpt!r} has {', '.join(found)}, which GPT-2 in Hugging Face transformers "
            f"(GPT2LMHeadModel) has no equivalent for: gptlab-export writes the classic GPT-2 "
            f"architecture only. Export a model trained with the GPT-2 value."
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
        activation_function=GPT2_ACTIVATION,
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


def write_model(
    state: dict[str, torch.Tensor], config: GPTConfig, tokenizer: Tokenizer, folder: Path
) -> int:
    """Save GPTModel weights `state` as GPT2LMHeadModel into `folder`; returns its number of
    parameters (a tied head counted once)."""
    import transformers
    from transformers.utils import logging as hf_logging

    # Built on the meta device, so no weights are initialised only to be replaced.
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(gpt2_config_for(config, tokenizer.eot_id))
    model.load_state_dict(to_gpt2_names(state, config), assign=True)
    model.tie_weights()  # one tensor for embedding and head when tie_word_embeddings
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
