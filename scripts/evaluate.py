"""Loss, perplexity and next-token accuracy of a model on text.

`python scripts/evaluate.py ckpt=last text_file=notes.txt show_tokens=20`, or on a
training config's split: `python scripts/evaluate.py pretrained=gpt2 data=verdict`.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from gptlab.cli import exit_on_config_error, resolve_device
from gptlab.errors import ConfigError
from gptlab.evaluation import (
    data_split_tokens,
    format_rows,
    score,
    text_file_tokens,
    token_rows,
    token_windows,
)
from gptlab.loading import load_model

log = logging.getLogger("evaluate")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    has_data = cfg.get("data") is not None
    if bool(cfg.text_file) == has_data:
        raise ConfigError(
            "Give exactly one text to score: text_file=<path> or data=<config> "
            f"(e.g. data=verdict split=val); got text_file={cfg.text_file!r} and "
            f"data={'set' if has_data else 'not set'}."
        )
    if cfg.show_tokens < 0:
        raise ConfigError(f"show_tokens={cfg.show_tokens} must be >= 0 (0 shows no table).")
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.ckpt, cfg.pretrained, cfg.paths.log_dir)
    model, tokenizer = loaded.model.to(device), loaded.tokenizer
    context_length = loaded.config.context_length
    if has_data:
        with open_dict(cfg.data):
            cfg.data.tokenizer = tokenizer.name
            cfg.data.context_length = context_length
        data = OmegaConf.to_container(cfg.data, resolve=True)
        tokens, datamodule = data_split_tokens(data, tokenizer, cfg.split)
        text = f"the {cfg.split} split of data={HydraConfig.get().runtime.choices['data']}"
        stride, batch_size = datamodule.stride, datamodule.batch_size
    else:
        tokens = text_file_tokens(cfg.text_file, tokenizer)
        text = f"text_file={cfg.text_file}"
        stride, batch_size = cfg.stride, cfg.batch_size
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1.")
    windows = token_windows(tokens, context_length, stride)
    log.info("Scoring %s with %s on %s", text, loaded.source, device)
    result = score(model, DataLoader(windows, batch_size=batch_size), device)
    if cfg.show_tokens:
        print(format_rows(token_rows(model, tokenizer, windows, cfg.show_tokens, device)))
        print()
    print(f"Model:      {loaded.source}")
    print(f"Text:       {text} ({len(tokens):,} tokens)")
    print(
        f"Windows:    {len(windows):,} of {windows.context_length} tokens, stride {windows.stride}"
    )
    print(f"Scored:     {result.tokens:,} tokens")
    print(f"Loss:       {result.loss:.4f}")
    print(f"Perplexity: {result.perplexity:.2f}")
    print(f"Accuracy:   {result.accuracy:.2%} (top-1 next token)")


if __name__ == "__main__":
    main()
