"""Benchmark a training step: `python scripts/bench.py model=<config> batch_size=N [...]`.

Prints tokens/s, median ms/step, MFU and peak memory for gptlab's Lightning step and for a
plain PyTorch loop with the same model, batch, precision and optimizer, and the overhead.
"""

import platform

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.benchmark import benchmark, report
from gptlab.cli import exit_on_config_error
from gptlab.errors import ConfigError
from gptlab.model import GPTConfig
from gptlab.tokenizers import CharTokenizer
from gptlab.train import model_settings, resolve_precision


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return models[0] if models else platform.processor() or platform.machine()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    for key in ("batch_size", "steps", "rounds"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1.")
    if cfg.warmup < 1:
        raise ConfigError(f"warmup={cfg.warmup} must be at least 1: the first step is untimed.")
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = str(resolve_precision(cfg.precision, accelerator))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["tokenizer"] == "char":
        tokenizer = CharTokenizer("".join(chr(33 + i) for i in range(cfg.char_vocab_size)))
        tokenizer_state = tokenizer.to_dict()
        vocab_size = tokenizer.vocab_size
    else:
        tokenizer_state, vocab_size = {"name": "gpt2"}, 50257
    settings = model_settings(model, vocab_size)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"Device: {name} ({accelerator}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, precision {precision}, compile {bool(model['compile'])}"
    )
    print(
        f"Model {cfg.model.get('arch')} d={settings.get('emb_dim')} L={settings.get('n_layers')} "
        f"ctx={settings['context_length']} vocab={vocab_size}; batch {cfg.batch_size}; "
        f"{cfg.rounds} rounds x ({cfg.warmup} warm-up + {cfg.steps} timed) steps per variant"
    )
    timings = benchmark(
        model_cfg=settings,
        tokenizer=tokenizer_state,
        optimizer_cfg=OmegaConf.to_container(cfg.optimizer, resolve=True),
        batch_size=cfg.batch_size,
        accelerator=accelerator,
        precision=precision,
        compile=bool(model["compile"]),
        gradient_clip_val=cfg.gradient_clip_val,
        log_every_n_steps=cfg.log_every_n_steps,
        steps=cfg.steps,
        warmup=cfg.warmup,
        rounds=cfg.rounds,
    )
    print(report(timings, GPTConfig(**settings), cfg.batch_size, device, precision))


if __name__ == "__main__":
    main()
