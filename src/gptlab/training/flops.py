"""Training FLOPs of a GPT, for throughput and model FLOPs utilisation (MFU).

The analytic count is PaLM's 6N + 12·L·T·d per token (N = parameters outside the
embeddings, L layers, T tokens of context, d width); `measured_flops_per_batch` counts
the same thing by tracing a meta-device model, so the two can be checked against each other.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops

from gptlab.model.gpt import GPTConfig, build_model


def matmul_parameters(config: GPTConfig) -> int:
    """Parameters that take part in matrix multiplies: everything but the embedding tables.

    Counted per module, so a head tied to the token embedding still counts its matmul.
    """
    if config.arch == "bigram":
        return 0
    with torch.device("meta"):
        model = build_model(config)
    return sum(
        p.numel()
        for m in model.modules()
        if not isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    )


def training_flops_per_batch(config: GPTConfig, batch_size: int, seq_len: int) -> int:
    """Forward + backward FLOPs for one batch of `batch_size` windows of `seq_len` tokens."""
    if config.arch == "bigram":
        return 0
    per_token = 6 * matmul_parameters(config) + 12 * config.n_layers * seq_len * config.emb_dim
    return per_token * batch_size * seq_len


def measured_flops_per_batch(config: GPTConfig, batch_size: int, seq_len: int) -> int:
    """The same count, traced by torch's FlopCounterMode on a meta-device model."""
    with torch.device("meta"):
        model = build_model(config)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
    return measure_flops(model, lambda: model(idx), loss_fn=torch.Tensor.sum)


# Dense bf16 (and fp16) tensor-core peaks, FLOP/s, from NVIDIA's datasheets, for the GPUs people
# rent; matched in this order against torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3").
GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),
    ("rtx 5090", 210e12),
)
TABLED_DTYPES = (torch.bfloat16, torch.float16)


def tabled_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """gptlab's peak for a GPU by name, in bf16 or fp16; None for anything else."""
    name = device_name.lower()
    if dtype not in TABLED_DTYPES:
        return None
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (`NVIDIA H100 80GB HBM3`), or `cpu`."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s in `dtype`: gptlab's table first (Lightning's lacks the H200,
    for one), then Lightning's; None where neither knows it (CPUs)."""
    if device.type == "cpu":
        return None
    return tabled_peak_flops(device_name(device), dtype) or get_available_flops(device, dtype)
