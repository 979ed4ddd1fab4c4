"""The GPU recipe, run on a CPU: what a GPU run combines, so CI sees what a GPU would do.

A GPU run uses bf16-mixed autocast, fused AdamW, clipping at 1.0, accumulation from
tokens_per_step, torch.compile and the nan guard that never waits for the device. Lightning
refuses clipping with fused AdamW under mixed precision, so this combination crashed every GPU
run; forcing each choice here makes that class of bug fail on a CPU too. The tests at the end
need CUDA and are skipped without it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_RUN, cpu_trainer, run_script
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.callbacks import NonFiniteLossGuard
from gptlab.training.module import GPTLightningModule
from gptlab.training.monitor import TrainingMonitor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on a CPU needs a C compiler",
)
# The choices a GPU run makes by default, forced so a CPU makes them too.
GPU_CHOICES = (
    "trainer.precision=bf16-mixed",
    "optimizer.fused=true",
    "trainer.gradient_clip_val=1.0",
    "callbacks.non_finite_guard.check=log_steps",
)


def recipe_module(compile: bool) -> GPTLightningModule:
    torch.manual_seed(0)
    return GPTLightningModule(
        {"vocab_size": 16, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
        {"lr": 1e-3, "fused": True},
        CharTokenizer("abcdefghijklmnop").to_dict(),
        compile=compile,
    )


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=[needs_compiler, pytest.mark.slow])]
)
def test_bf16_fused_adamw_clipping_and_accumulation_train_together(
    tmp_path: Path, compile: bool
) -> None:
    module = recipe_module(compile)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    monitor = TrainingMonitor()
    trainer = cpu_trainer(
        tmp_path,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        accumulate_grad_batches=2,
        max_steps=4,
        log_every_n_steps=2,
        enable_checkpointing=False,
        callbacks=[NonFiniteLossGuard(check="log_steps"), monitor],
    )
    trainer.fit(module, train_dataloaders=random_batches(16, 16, batch_size=4, n=8))
    assert trainer.optimizers[0].defaults["fused"], "the fused kernel, as on a GPU"
    assert trainer.global_step == 4
    assert [step for _, step, _ in monitor.train_losses] == [2, 4]
    assert all(math.isfinite(loss) for _, _, loss in monitor.train_losses)
    # The norm is measured before clipping, on the step's whole (accumulated) gradient.
    assert math.isfinite(float(module.grad_norm)) and float(module.grad_norm) > 0
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every parameter was updated"


class GradientsStepped(L.Callback):
    """The norm of the gradients the optimizer stepped with, read when Lightning zeroes them
    (at the start of the next step, so a run of n steps shows the first n - 1)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def test_clipping_bounds_the_gradients_the_fused_step_uses(tmp_path: Path) -> None:
    module, stepped = recipe_module(False), GradientsStepped()
    trainer = cpu_trainer(
        tmp_path,
        precision="bf16-mixed",
        gradient_clip_val=1e-3,  # far below the gradients' norm, so clipping must act
        max_steps=3,
        enable_checkpointing=False,
        callbacks=[stepped],
    )
    trainer.fit(module, train_dataloaders=random_batches(16, 16, batch_size=4, n=3))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(stepped.norms) == 2
    assert all(norm <= 1e-3 * 1.001 for norm in stepped.norms)
    assert float(module.grad_norm) > 10 * 1e-3, "the logged norm is the one before clipping"


@needs_compiler
def test_the_gpu_recipe_runs_through_the_script_on_a_cpu(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        *TINY_RUN,
        *GPU_CHOICES,
        "model.compile=true",
        "tokens_per_step=512",  # 2 micro-batches of 8 windows x 32 tokens
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert not [key for key in last["state_dict"] if "_orig_mod" in key]
    assert "Best val loss" in result.stdout


@needs_cuda
def test_gpu_run_resume_and_generate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_script(
        "train.py", *TINY_RUN, "trainer=gpu", "trainer.max_steps=6", f"hydra.run.dir={run_dir}"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_script(
        "train.py", *TINY_RUN, "trainer=gpu", "trainer.max_steps=10", f"resume={run_dir}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 10
    sample = run_script("generate.py", f"ckpt={last}", "max_new_tokens=20", "device=cuda")
    assert sample.returncode == 0, sample.stderr[-3000:]
    record = json.loads((run_dir / "run_summary.json").read_text())
    assert record["float32_matmul_precision"] == "high", "TF32 was off for the run"
    assert record["device"].startswith("NVIDIA") and record["precision"] == "bf16-mixed"


@needs_cuda
def test_gpt2_compiled_with_tokens_per_step_on_a_gpu(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "model=gpt2",
        "model.compile=true",
        "model.context_length=256",
        "data.batch_size=4",
        "tokens_per_step=2048",
        "trainer=gpu",
        "trainer.max_steps=3",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "max_new_tokens=5",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU" in result.stdout


@needs_cuda
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_ddp_and_fsdp_train_with_clipping_on_a_gpu(tmp_path: Path, trainer: str) -> None:
    result = run_script(
        "train.py",
        *TINY_RUN,
        f"trainer={trainer}",
        "trainer.devices=1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
