"""Sample text from a checkpoint or GPT-2 weights: `python scripts/generate.py ckpt=last`.

Tokens are printed as they are produced; log messages go to stderr.
"""

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import exit_on_config_error, resolve_device
from gptlab.generation import (
    check_sampling,
    encode_prompt,
    seeded_generator,
    stream_text,
    stream_tokens,
)
from gptlab.loading import load_model

log = logging.getLogger("generate")


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.num_samples)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.ckpt, cfg.pretrained, cfg.paths.log_dir)
    tokenizer = loaded.tokenizer
    prompt = torch.tensor([encode_prompt(tokenizer, cfg.prompt)], device=device)
    model = loaded.model.to(device)
    log.info("Sampling from %s on %s", loaded.source, device)
    generator = seeded_generator(cfg.seed, device)
    eos_id = tokenizer.eot_id if cfg.stop_at_eot else None
    for sample in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {sample + 1} of {cfg.num_samples} ---")
        print(cfg.prompt, end="", flush=True)
        tokens = stream_tokens(
            model,
            prompt,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_id=eos_id,
            generator=generator,
            use_cache=cfg.use_cache,
        )
        ids = (int(token[0]) for token in tokens)
        for text in stream_text(tokenizer, (i for i in ids if i != eos_id)):
            sys.stdout.write(text)
            sys.stdout.flush()
        print()


if __name__ == "__main__":
    main()
