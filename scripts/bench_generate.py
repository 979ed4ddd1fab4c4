"""Greedy decoding speed: the KV cache against the seed's no-cache loop.

`python scripts/bench_generate.py` times gpt124m (random weights) on the CPU generating
256 new tokens both ways, checks that both give the same tokens, and prints tokens/s.
The default prompt is empty (one `<|endoftext|>` token), so prompt and new tokens fit the
256-token context and the cache is used at every step. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gptlab.generation import encode_prompt, generate
from gptlab.model import GPTConfig, GPTModel
from gptlab.tokenizers import GPT2Tokenizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def generate_text_simple(
    model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """The seed notebooks' greedy loop: the whole cropped context at every step."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx_next = torch.argmax(torch.softmax(logits, dim=-1), dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt124m", help="a conf/model/*.yaml name")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a busy CPU"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    settings.pop("tokenizer")
    tokenizer = GPT2Tokenizer()
    settings["vocab_size"] = settings["vocab_size"] or tokenizer.vocab_size
    cfg = GPTConfig(**settings)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device).eval()
    prompt = torch.tensor([encode_prompt(tokenizer, args.prompt)], device=device)
    print(
        f"{args.model} ({cfg.context_length}-token context), {args.new_tokens} new tokens "
        f"after a {prompt.shape[1]}-token prompt, on {device} "
        f"(torch threads: {torch.get_num_threads()})"
    )
    generate(model, prompt, 8)  # warm-up: first-call allocations and kernel choices

    cached, cached_s = timed(lambda: generate(model, prompt, args.new_tokens), device)
    seed, seed_s = timed(
        lambda: generate_text_simple(model, prompt, args.new_tokens, cfg.context_length), device
    )
    if not torch.equal(cached, seed):
        first = int((cached != seed).nonzero()[0, 1])
        raise SystemExit(f"The two loops disagree from position {first}: the cache is wrong.")
    print(f"KV cache:        {args.new_tokens / cached_s:8.1f} tokens/s ({cached_s:.1f} s)")
    print(f"seed, no cache:  {args.new_tokens / seed_s:8.1f} tokens/s ({seed_s:.1f} s)")
    print(f"speed-up:        {seed_s / cached_s:8.1f}x, same {args.new_tokens} greedy tokens")


if __name__ == "__main__":
    main()
