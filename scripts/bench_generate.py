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

import torch

from gptlab.cli import model_preset
from gptlab.inference.generation import encode_prompt, generate, generate_text_simple
from gptlab.model.gpt import GPTConfig, build_model
from gptlab.model.tokenizers import GPT2Tokenizer
from gptlab.training.settings import model_settings


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

    model_group = model_preset(args.model)
    if model_group["tokenizer"] != GPT2Tokenizer.name:
        raise SystemExit(
            f"--model {args.model} needs a corpus for its vocabulary: pick a gpt2 one."
        )
    tokenizer = GPT2Tokenizer()
    cfg = GPTConfig(**model_settings(model_group, tokenizer.vocab_size))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
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
