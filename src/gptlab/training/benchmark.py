"""Training-step speed: gptlab's Lightning step against a plain PyTorch loop, interleaved.

Both variants train the same model (same initial weights) on the same batches with the same
precision, optimizer (AdamW groups, fused where `fused: auto` fuses), gradient clipping and
schedule. A step is timed from the end of one optimizer step to the end of the next, so data
fetching and everything Lightning does between steps count. Rounds alternate which variant
goes first, so drift in a shared machine's speed hits both alike.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from gptlab.checks import check_count
from gptlab.model.gpt import GPTConfig, build_model
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.cost import peak_memory_bytes
from gptlab.training.flops import peak_flops, training_flops_per_batch
from gptlab.training.module import GPTLightningModule, model_loss
from gptlab.training.monitor import TrainingMonitor, compute_dtype, synchronized_clock
from gptlab.training.optim import OptimizerSettings, build_optimizer
from gptlab.training.settings import (
    check_accelerator,
    configure_matmul_precision,
    device_type_of,
    model_settings,
    resolve_precision,
)

VARIANTS = ("lightning", "plain")
# GPT-2's BPE vocabulary, so gpt2 models are benchmarked without loading the tokenizer.
GPT2_VOCAB_SIZE = 50257


@dataclass
class Timings:
    """Seconds per timed step, and peak accelerator memory, of one variant."""

    seconds: list[float] = field(default_factory=list)
    peak_memory: int = 0


class StepTimer(L.Callback):
    """Times batch-end to batch-end inside Lightning's loop, after `warmup` steps."""

    def __init__(self, warmup: int, timings: Timings) -> None:
        self.warmup = warmup
        self.timings = timings
        self._last: float | None = None
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = synchronized_clock(trainer.strategy.root_device)
        self._steps += 1
        if self._last is not None and self._steps > self.warmup:
            self.timings.seconds.append(now - self._last)
        self._last = now


def random_batches(vocab_size: int, context_length: int, batch_size: int, n: int) -> DataLoader:
    tokens = torch.randint(
        0,
        vocab_size,
        (n * batch_size, context_length + 1),
        generator=torch.Generator().manual_seed(0),
    )
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


def lightning_round(
    module: GPTLightningModule,
    loader: DataLoader,
    accelerator: str,
    precision: str,
    gradient_clip_val: float,
    log_every_n_steps: int,
    warmup: int,
    timings: Timings,
) -> None:
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=len(loader),
        gradient_clip_val=gradient_clip_val,
        log_every_n_steps=log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        # What a real run reads and logs each written step (loss, lr, grad norm, tokens/s).
        callbacks=[TrainingMonitor(), StepTimer(warmup, timings)],
    )
    trainer.fit(module, train_dataloaders=loader)


def plain_round(
    model: torch.nn.Module,
    loss_of: Callable[..., torch.Tensor],
    loader: DataLoader,
    device: torch.device,
    precision: str,
    optimizer_settings: OptimizerSettings,
    gradient_clip_val: float,
    warmup: int,
    timings: Timings,
) -> None:
    """The loop a hand-written trainer runs: forward and loss, backward, clip, step, zero."""
    fused = optimizer_settings.use_fused(device.type, precision, bool(gradient_clip_val))
    optimizer, scheduler = build_optimizer(
        model, optimizer_settings, fused, total_steps=len(loader)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    last: float | None = None
    model.train()
    for step, (inputs, targets) in enumerate(loader, start=1):
        inputs, targets = (
            inputs.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        with autocast:
            loss = loss_of(model, inputs, targets)
        loss.backward()
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = synchronized_clock(device)
        if last is not None and step > warmup:
            timings.seconds.append(now - last)
        last = now


def benchmark(
    model_config: GPTConfig,
    tokenizer: dict,
    optimizer_settings: OptimizerSettings,
    batch_size: int,
    accelerator: str,
    precision: str,
    compile: bool,
    gradient_clip_val: float,
    log_every_n_steps: int,
    steps: int,
    warmup: int,
    rounds: int,
) -> dict[str, Timings]:
    """Per-variant step timings over `rounds` interleaved rounds of `warmup + steps` steps."""
    module = GPTLightningModule(model_config, optimizer_settings, tokenizer, compile=compile)
    device = torch.device(device_type_of(accelerator))
    plain = build_model(model_config).to(device)
    plain.load_state_dict(module.model.state_dict())
    loss_of = torch.compile(model_loss) if compile else model_loss
    loader = random_batches(
        model_config.vocab_size, model_config.context_length, batch_size, warmup + steps
    )
    timings = {variant: Timings() for variant in VARIANTS}
    for round_index in range(rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if variant == "lightning":
                lightning_round(
                    module,
                    loader,
                    accelerator,
                    precision,
                    gradient_clip_val,
                    log_every_n_steps,
                    warmup,
                    timings[variant],
                )
            else:
                plain_round(
                    plain,
                    loss_of,
                    loader,
                    device,
                    precision,
                    optimizer_settings,
                    gradient_clip_val,
                    warmup,
                    timings[variant],
                )
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                timings[variant].peak_memory = max(timings[variant].peak_memory, peak)
    return timings


def report(
    timings: dict[str, Timings],
    config: GPTConfig,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> str:
    """A table of tokens/s, median ms/step, MFU and peak memory, and the overhead ratio."""
    flops = training_flops_per_batch(config, batch_size, config.context_length)
    dtype = compute_dtype(precision)
    peak = peak_flops(device, dtype)
    lines = [f"{'variant':<10} {'tokens/s':>12} {'ms/step':>10} {'MFU':>8} {'peak mem':>12}"]
    medians = {}
    for variant, timing in timings.items():
        median = statistics.median(timing.seconds)
        medians[variant] = median
        mfu = f"{flops / median / peak:.1%}" if peak else "n/a"
        memory = f"{timing.peak_memory / 2**20:,.0f} MiB" if device.type == "cuda" else "-"
        tokens = batch_size * config.context_length / median
        lines.append(f"{variant:<10} {tokens:>12,.0f} {1000 * median:>10.2f} {mfu:>8} {memory:>12}")
    overhead = medians["lightning"] / medians["plain"] - 1
    lines.append(f"Lightning overhead: {overhead:+.1%} ms/step over the plain loop")
    if device.type == "cpu":
        peak_rss = peak_memory_bytes() / 2**20
        lines.append(
            f"Process peak RSS: {peak_rss:,.0f} MiB (both variants; CPU has no per-phase peak)"
        )
    if not peak:
        lines.append(f"MFU n/a: no peak FLOP/s is known for {device.type} ({dtype})")
    n = {variant: len(t.seconds) for variant, t in timings.items()}
    lines.append(f"Steps timed per variant: {n}; analytic FLOPs per step: {flops:.3e}")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return models[0] if models else platform.processor() or platform.machine()


def benchmark_from_config(cfg: DictConfig) -> None:
    """`gptlab-bench`: the Lightning step against the plain loop for `cfg.model`, printed."""
    for key in ("batch_size", "steps", "rounds"):
        check_count(key, cfg[key], 1)
    check_count("warmup", cfg.warmup, 1, ": the first step is untimed")
    accelerator = check_accelerator(cfg.accelerator)
    device = torch.device(device_type_of(accelerator))
    if accelerator == "auto":
        accelerator = "gpu" if device.type == "cuda" else "cpu"
    precision = resolve_precision(cfg.precision, accelerator)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["tokenizer"] == "char":
        alphabet = "".join(chr(33 + i) for i in range(cfg.char_vocab_size))
        tokenizer, vocab_size = CharTokenizer(alphabet).to_dict(), cfg.char_vocab_size
    else:
        tokenizer, vocab_size = {"name": "gpt2"}, GPT2_VOCAB_SIZE
    config = GPTConfig(**model_settings(model, vocab_size))
    optimizer = OptimizerSettings.from_mapping(OmegaConf.to_container(cfg.optimizer, resolve=True))
    optimizer.check_fused(precision, bool(cfg.gradient_clip_val))
    configure_matmul_precision(device.type)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"Device: {name} ({accelerator}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, precision {precision}, compile {bool(model['compile'])}"
    )
    print(
        f"Model {config.arch} d={config.emb_dim} L={config.n_layers} ctx={config.context_length} "
        f"vocab={vocab_size}; batch {cfg.batch_size}; {cfg.rounds} rounds x ({cfg.warmup} "
        f"warm-up + {cfg.steps} timed) steps per variant"
    )
    timings = benchmark(
        model_config=config,
        tokenizer=tokenizer,
        optimizer_settings=optimizer,
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
    print(report(timings, config, cfg.batch_size, device, precision))
