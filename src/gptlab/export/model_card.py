"""The exported folder's README.md: what the model is, how it was trained, how well it did
and how to load it, read from the checkpoint and the run's record beside it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gptlab.data.datamodule import GPTDataModule
from gptlab.model.tokenizers import CharTokenizer, Tokenizer
from gptlab.training.checkpoints import CHECKPOINT_DIR, read_checkpoint
from gptlab.training.monitor import TrainingMonitor
from gptlab.training.records import RUN_RECORD, read_run_record

MODEL_CARD_FILE = "README.md"
EXAMPLE_PROMPT = "Every effort moves you"
EXAMPLE_NEW_TOKENS = 50
# Hugging Face's metadata header: the library that loads it, the task and tags (the last one
# the transformers model type).
FRONT_MATTER = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- gptlab
- {model_type}
---
"""


def model_card(
    ckpt: Path,
    hparams: Mapping[str, Any],
    tokenizer: Tokenizer,
    n_parameters: int,
    folder: str,
    model_class: str,
    model_type: str,
) -> str:
    """The card of checkpoint `ckpt` (`hparams`: its hyperparameters, `tokenizer`: the one
    they describe), exported to `folder` as transformers' `model_class` (of `model_type`)."""
    saved = read_checkpoint(ckpt, f"ckpt={str(ckpt)!r}", "export another checkpoint of its run.")
    model = dict(hparams["model"])
    prompt, max_new_tokens = example_prompt(tokenizer, model["context_length"])
    lines = [
        FRONT_MATTER.format(model_type=model_type),
        f"# {Path(folder).name}\n",
        f"A GPT language model ({n_parameters:,} parameters) trained from scratch with gptlab "
        f"and exported from `{ckpt}` by `gptlab-export` as a `{model_class}`.\n",
        "## Training config\n",
        "```yaml",
        OmegaConf.to_yaml(training_config(saved, model, tokenizer, hparams["optimizer"])).strip(),
        "```\n",
        "## Results\n",
        *results(saved, ckpt),
        "## How to load it\n",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(folder)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(folder)})",
        'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        f"print(generate({json.dumps(prompt)}, max_new_tokens={max_new_tokens}, "
        'do_sample=False)[0]["generated_text"])',
        "```\n",
        tokenizer_note(tokenizer, model["context_length"]),
    ]
    return "\n".join(lines)


def training_config(
    saved: Mapping[str, Any], model: dict, tokenizer: Tokenizer, optimizer: Mapping[str, Any]
) -> dict[str, Any]:
    """The model, tokenizer, data and optimizer settings the checkpoint was trained with."""
    config = {"model": model, "tokenizer": {"name": tokenizer.name, "tokens": tokenizer.vocab_size}}
    data = saved.get(GPTDataModule.__qualname__)
    if data:
        corpus = {key: value for key, value in data["corpus"].items() if value is not None}
        config["data"] = {**corpus, **data["loader"]}
    config["optimizer"] = dict(optimizer)
    return config


def results(saved: Mapping[str, Any], ckpt: Path) -> list[str]:
    """Steps and val losses from the checkpoint, and the run's record when it is beside it."""
    monitor = TrainingMonitor()
    state = saved.get("callbacks", {}).get(monitor.state_key)
    if state is not None:
        monitor.load_state_dict(state)
    lines = [f"- Saved at optimizer step {saved.get('global_step', '?')}"]
    if monitor.tokens_seen:
        lines[0] += f", after {monitor.tokens_seen:,} training tokens"
    lines[0] += "."
    if monitor.val_losses:
        _, last_step, last = monitor.val_losses[-1]
        _, best_step, best = min(monitor.val_losses, key=lambda point: point[2])
        lines.append(f"- Val loss {val_loss(last)} at step {last_step}, its last validation.")
        lines.append(f"- Best val loss {val_loss(best)} at step {best_step}.")
    run_dir = ckpt.parent.parent
    if ckpt.parent.name == CHECKPOINT_DIR and (run_dir / RUN_RECORD).is_file():
        record = read_run_record(run_dir)
        summary = f"- The run ({RUN_RECORD}): {record.status}"
        if record.best_val_loss is not None:
            summary += f", best val loss {record.best_val_loss:.4f}"
        if record.steps is not None:
            summary += f" over {record.steps} steps"
        if record.device:
            summary += f" on {record.device} ({record.precision})"
        lines.append(summary + ".")
    return [*lines, ""]


def val_loss(loss: float) -> str:
    return f"{loss:.4f} (perplexity {math.exp(loss):.2f})"


def example_prompt(tokenizer: Tokenizer, context_length: int) -> tuple[str, int]:
    """A prompt the tokenizer can encode (a char vocabulary may lack some of its letters) and
    how many tokens to add to it: transformers does not crop a context longer than the model's,
    as gptlab-generate does, so prompt and new tokens must fit in `context_length`."""
    prompt = EXAMPLE_PROMPT
    if isinstance(tokenizer, CharTokenizer) and not set(prompt) <= set(tokenizer.chars):
        prompt = tokenizer.chars[:8]
    ids = tokenizer.encode(prompt)[: max(1, context_length // 2)]
    return tokenizer.decode(ids), min(EXAMPLE_NEW_TOKENS, context_length - len(ids))


def tokenizer_note(tokenizer: Tokenizer, context_length: int) -> str:
    """What the tokenizer accepts, which differs between gptlab's two."""
    context = (
        f"The model reads at most {context_length} tokens, its training context: keep the "
        f"prompt and max_new_tokens within them."
    )
    if isinstance(tokenizer, CharTokenizer):
        return (
            f"The tokenizer has one token per character of the training corpus "
            f"({tokenizer.vocab_size} characters) and no unknown token: text with any other "
            f"character cannot be encoded. {context}\n"
        )
    return (
        f"The tokenizer is OpenAI's GPT-2 BPE; `<|endoftext|>` separates documents and is the "
        f"BOS and EOS token, so generation stops at it. {context}\n"
    )
