"""OpenAI's GPT-2 weights, read from a Hugging Face `GPT2LMHeadModel` checkpoint into GPTModel.

Hugging Face stores GPT-2 as OpenAI did: one fused `c_attn` projection for queries, keys
and values, `Conv1D` layers whose weights are the transpose of `nn.Linear`'s, and an output
head tied to the token embedding. The tensors are read directly (safetensors or a torch
state dict), so `transformers` is not needed.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig, GPTModel

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Every published GPT-2 size uses 64-dimensional heads; used when config.json is missing.
GPT2_HEAD_DIM = 64
# transformers' activations equal to GPTModel's GELU, by its `gelu_approximate`.
GELUS = {
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu": "none",
}
# GPT2Config settings that GPTModel implements only at GPT-2's own values.
GPT2_FIXED = {
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
# GPT-2's tensor names (without the `transformer.` prefix) and GPTModel's: this one table reads
# GPT-2 weights here and writes them in gptlab.export.
GPT2_NAMES = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}
# Inside block `h.<i>.` (GPTModel: `trf_blocks.<i>.`), for both `.weight` and `.bias`.
GPT2_BLOCK_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}
GPT2_BLOCK_CONV1D = {
    "attn.c_proj": "att.out_proj",
    "mlp.c_fc": "ff.layers.0",
    "mlp.c_proj": "ff.layers.2",
}
# `attn.c_attn` is one Conv1D for queries, keys and values, stacked in this order.
GPT2_FUSED_QKV = "attn.c_attn"
GPTMODEL_QKV = ("att.W_query", "att.W_key", "att.W_value")


def resolve_weights(source: str, key: str = "pretrained") -> Path:
    """The weights file of a local folder or file, or of a hub id (downloaded, then cached);
    `key` is the setting that named it, for error messages."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(
            f"{key}={source!r} is a folder without {' or '.join(WEIGHT_FILES)}: point at a "
            f"folder written by GPT2LMHeadModel.save_pretrained, or at one of those files."
        )
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise ConfigError(f"{key}={source!r} does not exist: check the path.")
    return download_weights(source, key)


def download_weights(repo_id: str, key: str = "pretrained") -> Path:
    """Fetch config.json and the weights of a hub model such as `gpt2` or `gpt2-medium`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{key}={repo_id!r} is not a local path, and downloading it needs "
            f"huggingface_hub: pip install huggingface_hub, or give a local folder."
        ) from None
    for name in WEIGHT_FILES:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", name]))
        except Exception as err:
            raise ConfigError(
                f"{key}={repo_id!r} is neither a local file or folder nor a model that "
                f"could be downloaded from the Hugging Face hub ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Check the path or the id, "
                f"or download it once where there is network access."
            ) from None
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{key}={repo_id!r} on the hub has none of {', '.join(WEIGHT_FILES)}.")


def read_failure(err: Exception) -> str:
    """Why torch.load or safetensors could not read a file, in one line."""
    if isinstance(err, pickle.UnpicklingError):
        return "not a PyTorch file of tensors"
    first_line = str(err).splitlines()[0] if str(err) else "the file is empty or truncated"
    return f"{type(err).__name__}: {first_line}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict, with clear errors for bad files."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ConfigError(
            f"{path} is a safetensors file: pip install safetensors to read it."
        ) from None
    except Exception as err:
        raise ConfigError(
            f"{path} could not be read as model weights ({read_failure(err)}): the file is "
            f"corrupt or incomplete; download or save it again."
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return state


def gpt2_config(state: dict[str, torch.Tensor], folder: Path) -> GPTConfig:
    """Sizes from the tensors themselves; the head count from config.json when present."""
    n_heads = None
    gelu_approximate = "tanh"
    config_file = folder / "config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text())
        activation = settings.get("activation_function", "gelu_new")
        if activation not in GELUS:
            raise ConfigError(
                f"{config_file} uses activation_function={activation!r}; GPTModel implements "
                f"the GELUs {', '.join(GELUS)} only."
            )
        gelu_approximate = GELUS[activation]
        for key, value in GPT2_FIXED.items():
            if settings.get(key, value) != value:
                raise ConfigError(
                    f"{config_file} sets {key}={settings[key]!r}; GPTModel implements GPT-2's "
                    f"{key}={value!r} only, so its outputs would differ."
                )
        n_heads = settings.get("n_head")
    vocab_size, emb_dim = state["wte.weight"].shape
    layers = {int(m.group(1)) for key in state if (m := re.match(r"h\.(\d+)\.", key))}
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=state["wpe.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=n_heads or emb_dim // GPT2_HEAD_DIM,
        n_layers=len(layers),
        drop_rate=0.0,
        qkv_bias=True,
        gelu_approximate=gelu_approximate,
    )


def conv1d_layout(tensor: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight, stored (in, out), as nn.Linear's (out, in), or back: a transpose is its
    own inverse. Biases are the same in both."""
    return tensor.t() if tensor.ndim == 2 else tensor


def to_gptmodel_names(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPTModel's state dict from GPT-2's: split c_attn, transpose Conv1D, fill the head."""
    state = {ours: hf[name] for name, ours in GPT2_NAMES.items()}
    state["pos_emb.weight"] = state["pos_emb.weight"][: config.context_length]
    # save_pretrained drops the tied head; older files repeat the embedding.
    state["out_head.weight"] = hf.get("lm_head.weight", hf["wte.weight"])
    for i in range(config.n_layers):
        h, ours = f"h.{i}.", f"trf_blocks.{i}."
        for part in ("weight", "bias"):
            for name, our_name in GPT2_BLOCK_NORMS.items():
                state[f"{ours}{our_name}.{part}"] = hf[f"{h}{name}.{part}"]
            for name, our_name in GPT2_BLOCK_CONV1D.items():
                state[f"{ours}{our_name}.{part}"] = conv1d_layout(hf[f"{h}{name}.{part}"])
            fused = conv1d_layout(hf[f"{h}{GPT2_FUSED_QKV}.{part}"]).chunk(3, dim=0)
            for our_name, tensor in zip(GPTMODEL_QKV, fused, strict=True):
                state[f"{ours}{our_name}.{part}"] = tensor
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def gpt2_weights(source: str, key: str = "pretrained") -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The model config and GPTModel state dict of a Hugging Face GPT-2 checkpoint."""
    path = resolve_weights(source, key)
    state = {
        name.removeprefix("transformer."): tensor for name, tensor in read_state_dict(path).items()
    }
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ConfigError(
            f"{path} is not a GPT-2 checkpoint: it has no wte/wpe embeddings (keys such as "
            f"{sorted(state)[:3]}). Give a GPT2LMHeadModel folder or weights file."
        )
    config = gpt2_config(state, path.parent)
    try:
        return config, to_gptmodel_names(state, config)
    except KeyError as err:
        raise ConfigError(f"{path} is not a complete GPT-2 checkpoint: {err} is missing.") from None


def load_gpt2(source: str) -> GPTModel:
    """A GPTModel in eval mode holding the GPT-2 weights of a local folder, file or hub id."""
    config, state = gpt2_weights(source)
    model = GPTModel(config)
    model.load_state_dict(state)
    return model.eval()
