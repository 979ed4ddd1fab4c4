"""Where a trained model comes from: a gptlab checkpoint or OpenAI's GPT-2 weights.

Scripts that use a model (generate, evaluate, train's `init_from`) go through here, so a
missing, corrupt or mismatched file gives the same clear message everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig
from gptlab.model.pretrained import gpt2_weights, load_gpt2, resolve_weights
from gptlab.model.tokenizers import GPT2Tokenizer, Tokenizer
from gptlab.training.checkpoints import (
    CHECKPOINT_SUFFIX,
    check_weights_fit,
    find_best_checkpoint,
    find_last_checkpoint,
    read_checkpoint,
)
from gptlab.training.module import GPTLightningModule


@dataclass
class LoadedModel:
    """A model ready for inference, with the tokenizer its ids belong to."""

    model: nn.Module
    tokenizer: Tokenizer
    config: GPTConfig
    source: str


def load_checkpoint(path: str | Path, key: str = "ckpt") -> GPTLightningModule:
    """The LightningModule saved at `path` (the setting `key`), rebuilt from its own
    hyperparameters, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{key}={str(path)!r} is not a file: give the path of a .ckpt written by "
            f"scripts/train.py (e.g. outputs/<date>/<time>/checkpoints/last.ckpt) or ckpt=last."
        )
    instead = "use another checkpoint of the run, e.g. its best-*.ckpt."
    checkpoint = read_checkpoint(path, f"{key}={str(path)!r}", instead)
    module = GPTLightningModule(**checkpoint["hyper_parameters"])
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(
            f"{key}={str(path)!r} does not match the model its hyperparameters describe: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return module.eval()


def load_model(ckpt: str | None, pretrained: str | None, log_dir: str | Path) -> LoadedModel:
    """Exactly one of a checkpoint (a path, `last` or `best`) and GPT-2 weights (a folder, file
    or id)."""
    if bool(ckpt) == bool(pretrained):
        raise ConfigError(
            f"Give exactly one model: ckpt=<path to a .ckpt> or ckpt=last, or "
            f"pretrained=<GPT-2 folder, file or hub id such as gpt2> "
            f"(got ckpt={ckpt!r}, pretrained={pretrained!r})."
        )
    if ckpt:
        finders = {"last": find_last_checkpoint, "best": find_best_checkpoint}
        path = finders[ckpt](log_dir) if ckpt in finders else Path(ckpt)
        module = load_checkpoint(path)
        return LoadedModel(module.model, module.tokenizer, module.config, str(path))
    model = load_gpt2(pretrained)
    tokenizer = GPT2Tokenizer()
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"pretrained={pretrained!r} has a {model.config.vocab_size}-token vocabulary, but the "
            f"GPT-2 tokenizer has {tokenizer.vocab_size} tokens: give GPT-2 weights."
        )
    return LoadedModel(model, tokenizer, model.config, pretrained)


VOCAB_ROWS = ("tok_emb.weight", "out_head.weight")


def find_initial_weights(source: str) -> Path:
    """The file `init_from` names, found (or downloaded) before any data is loaded."""
    if not source.endswith(CHECKPOINT_SUFFIX):
        return resolve_weights(source, key="init_from")
    if not Path(source).is_file():
        raise ConfigError(
            f"init_from={source!r} is not a file: give a .ckpt written by scripts/train.py, "
            f"or GPT-2 weights (a folder, file or hub id such as gpt2)."
        )
    return Path(source)


def initial_weights(source: str) -> tuple[GPTConfig, dict, dict[str, torch.Tensor]]:
    """Weights to start training from, with their model config and tokenizer: a gptlab
    .ckpt, or GPT-2 weights in Hugging Face format."""
    if source.endswith(CHECKPOINT_SUFFIX):
        module = load_checkpoint(source, key="init_from")
        return module.config, module.tokenizer.to_dict(), module.model.state_dict()
    config, state = gpt2_weights(source, key="init_from")
    return config, {"name": GPT2Tokenizer.name}, state


def load_initial_weights(module: GPTLightningModule, source: str) -> None:
    """Copy `source`'s weights into `module.model`. Architecture and tokenizer must agree,
    except that a shorter context keeps the first positions of the position embedding."""
    weights_config, tokenizer, state = initial_weights(source)
    if tokenizer != module.tokenizer.to_dict():
        raise ConfigError(
            f"init_from={source!r} was trained with the {tokenizer['name']} tokenizer"
            f"{' on another corpus' if tokenizer['name'] == module.tokenizer.name else ''}, so "
            f"its token ids mean other things than this run's {module.tokenizer.name} tokens: "
            f"train with model.tokenizer={tokenizer['name']} and the same data."
        )
    config = module.config
    check_weights_fit(config, weights_config, source)
    if config.context_length > weights_config.context_length:
        raise ConfigError(
            f"model.context_length={config.context_length} is longer than the "
            f"{weights_config.context_length} positions of init_from={source!r}: set "
            f"model.context_length to {weights_config.context_length} or less."
        )
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][: config.context_length]
    for name in VOCAB_ROWS:
        if name in state:
            state[name] = with_vocab_rows(state[name], config.vocab_size, config.padded_vocab_size)
    if config.tie_weights and not torch.equal(state["tok_emb.weight"], state["out_head.weight"]):
        raise ConfigError(
            f"init_from={source!r} has an output head separate from its token embedding, but "
            f"model.tie_weights=true would make them one: set model.tie_weights=false."
        )
    module.model.load_state_dict(state)


def with_vocab_rows(weight: torch.Tensor, vocab_size: int, rows: int) -> torch.Tensor:
    """The real vocabulary's rows of `weight`, zero-padded to `rows` (padding never scores)."""
    real = weight[:vocab_size]
    return torch.cat([real, real.new_zeros(rows - vocab_size, *real.shape[1:])])
