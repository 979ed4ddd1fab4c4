"""scripts/bench.py: both variants run the same training, and the script reports on both."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import run_script
from gptlab.model.gpt import GPTModel
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import Timings, lightning_round, plain_round, random_batches
from gptlab.training.module import GPTLightningModule, model_loss
from gptlab.training.optim import OptimizerSettings


def test_plain_loop_trains_exactly_like_the_lightning_step() -> None:
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefgh")
    model = {
        "vocab_size": 8,
        "context_length": 16,
        "emb_dim": 16,
        "n_heads": 2,
        "n_layers": 2,
        "drop_rate": 0.0,
    }
    optimizer = {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    module = GPTLightningModule(model, optimizer, tokenizer.to_dict())
    plain = GPTModel(module.config)
    plain.load_state_dict(module.model.state_dict())
    initial = {name: tensor.clone() for name, tensor in plain.state_dict().items()}
    loader = random_batches(8, 16, batch_size=4, n=4)
    # A clip threshold low enough to bite, so clipping must match too.
    lightning_round(
        module, loader, "cpu", "32-true", 0.05, log_every_n_steps=2, warmup=1, timings=Timings()
    )
    timings = Timings()
    settings = OptimizerSettings.from_mapping(optimizer)
    plain_round(
        plain, model_loss, loader, torch.device("cpu"), "32-true", settings, 0.05, 1, timings
    )
    assert len(timings.seconds) == 3
    trained = module.model.state_dict()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=1e-5, atol=1e-6, msg=name)
    # Both trained: equal to each other, and neither left at the weights they started from.
    for name, tensor in initial.items():
        if name.endswith("weight") and tensor.dim() == 2:
            assert not torch.equal(trained[name], tensor), f"{name} never changed"


def test_bench_script_reports_both_variants(tmp_path) -> None:
    result = run_script(
        "bench.py",
        "model=tiny",
        "batch_size=2",
        "steps=2",
        "warmup=1",
        "rounds=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for variant in ("lightning", "plain"):
        row = re.search(rf"^{variant} +([\d,]+) +([\d.]+) +n/a", out, re.MULTILINE)
        assert row, out
        tokens_per_s, ms = float(row[1].replace(",", "")), float(row[2])
        # Rounded to whole tokens/s and 0.01 ms, so they agree to rounding.
        assert tokens_per_s == pytest.approx(2 * 32 / ms * 1000, rel=0.01)
    assert re.search(r"Lightning overhead: [+-]\d+\.\d%", out)
    assert "{'lightning': 4, 'plain': 4}" in out
    assert "MFU n/a" in out
