"""Training FLOPs of a GPT, for throughput and model FLOPs utilisation (MFU).

The analytic count is PaLM's 6N + 12·L·T·d per token (N = parameters outside the
embeddings, L layers, T tokens of context, d width); `measured_flops_per_batch` counts
the same thing by tracing a meta-device model, so the two can be checked against each other.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.throughput import measure_flops

from gptlab.model import GPTConfig, build_model


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
