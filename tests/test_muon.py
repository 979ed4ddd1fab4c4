"""optimizer=muon: torch.optim.Muon for the block matrices, AdamW for the rest, as one optimizer
that Lightning's schedule, clipping, precision, accumulation and checkpoints all work with."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from conftest import TINY_RUN, cpu_trainer, run_script
from gptlab.errors import ConfigError
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.module import GPTLightningModule
from gptlab.training.optim import MuonWithAdamW, OptimizerSettings
from gptlab.training.run import run, validate
from test_gpu_recipe import GradientsStepped
from test_resume import curve

VOCAB = "abcdefghijklmnop"
MODEL = {"vocab_size": len(VOCAB), "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2}
MUON = {"name": "muon", "lr": 1e-3, "muon_lr": 0.02}


def muon_module(optimizer: dict | None = None, **model) -> GPTLightningModule:
    torch.manual_seed(0)
    return GPTLightningModule(
        {**MODEL, **model}, {**MUON, **(optimizer or {})}, CharTokenizer(VOCAB).to_dict()
    )


def configured(module: GPTLightningModule, tmp_path: Path) -> MuonWithAdamW:
    module.trainer = cpu_trainer(tmp_path, max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MuonWithAdamW)
    return optimizer


def ids(params) -> list[int]:
    return sorted(id(p) for p in params)


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"tie_weights": True, "qkv_bias": True},
        {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True},
    ],
)
def test_muon_takes_exactly_the_matrices_inside_the_blocks(tmp_path: Path, model: dict) -> None:
    module = muon_module(**model)
    optimizer = configured(module, tmp_path)
    named = dict(module.named_parameters())  # a tied embedding and head appear once
    in_blocks = [p for n, p in named.items() if n.startswith("model.trf_blocks.") and p.dim() == 2]
    assert len(in_blocks) >= 4 * MODEL["n_layers"]  # q, k, v, out and the MLP's, per block
    (muon_group,) = optimizer.muon.param_groups
    assert ids(muon_group["params"]) == ids(in_blocks)
    rest = [p for p in named.values() if all(p is not q for q in in_blocks)]
    decayed, plain = optimizer.adamw.param_groups
    assert ids(decayed["params"] + plain["params"]) == ids(rest)
    # AdamW decays the embeddings and head (2-D), never the norms and biases.
    assert module.model.tok_emb.weight in decayed["params"]
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert plain["params"] and all(p.dim() < 2 for p in plain["params"])
    assert (muon_group["lr"], decayed["lr"]) == (0.02, 1e-3)
    # One optimizer for Lightning; its first group's lr, what the monitor logs, is AdamW's.
    assert ids(p for g in optimizer.param_groups for p in g["params"]) == ids(named.values())
    assert optimizer.param_groups[0]["lr"] == 1e-3


class LearningRates(L.Callback):
    """The learning rate each inner optimizer steps with, by step."""

    def __init__(self) -> None:
        self.muon: list[float] = []
        self.adamw: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.muon.append(optimizer.muon.param_groups[0]["lr"])
        self.adamw.append([group["lr"] for group in optimizer.adamw.param_groups])


def test_the_schedule_scales_both_learning_rates_from_their_own_base(tmp_path: Path) -> None:
    schedule = {"schedule": "cosine", "warmup_steps": 2, "min_lr": 1e-4}
    module, rates = muon_module(schedule), LearningRates()
    trainer = cpu_trainer(tmp_path, max_steps=6, enable_checkpointing=False, callbacks=[rates])
    trainer.fit(module, train_dataloaders=random_batches(len(VOCAB), 16, batch_size=4, n=6))
    settings = OptimizerSettings(**MUON, **schedule)
    multipliers = [settings.lr_multiplier(step, total_steps=6) for step in range(6)]
    assert multipliers[0] == pytest.approx(0.5) and multipliers[-1] < 0.5  # warmup, then decay
    assert rates.muon == pytest.approx([0.02 * m for m in multipliers])
    for group in range(2):  # decayed and not
        assert [lrs[group] for lrs in rates.adamw] == pytest.approx([1e-3 * m for m in multipliers])


def test_bf16_mixed_accumulation_clipping_and_fused_adamw_train_with_muon(tmp_path: Path) -> None:
    module = muon_module({"fused": True})  # AdamW's part fused, as auto chooses on a GPU
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    stepped = GradientsStepped()
    trainer = cpu_trainer(
        tmp_path,
        precision="bf16-mixed",
        gradient_clip_val=1e-3,  # far below the gradients' norm, so clipping must act
        accumulate_grad_batches=2,
        max_steps=3,
        enable_checkpointing=False,
        callbacks=[stepped],
    )
    trainer.fit(module, train_dataloaders=random_batches(len(VOCAB), 16, batch_size=4, n=6))
    optimizer = trainer.optimizers[0]
    assert optimizer.adamw.defaults["fused"]
    # 6 micro-batches, 3 optimizer steps: both optimizers stepped once per 2 micro-batches.
    assert trainer.global_step == 3
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    adamw_params = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    assert {float(optimizer.state[p]["step"]) for p in adamw_params} == {3.0}
    for p in optimizer.muon.param_groups[0]["params"]:
        assert optimizer.state[p]["momentum_buffer"].abs().sum() > 0
    # The updates used the clipped gradients; the logged norm is the one before clipping.
    assert len(stepped.norms) == 2 and all(norm <= 1e-3 * 1.001 for norm in stepped.norms)
    assert float(module.grad_norm) > 10 * 1e-3
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every parameter was updated"


HALF = 6
RUN = (
    *(o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_"))),
    "optimizer=muon",
    f"optimizer.warmup_steps={HALF + 2}",  # the schedule's position carries across the resume
    f"trainer.val_check_interval={HALF}",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "max_new_tokens=1",
)


def train(compose: Callable[..., DictConfig], run_dir: Path, steps: int, *extra: str) -> float:
    cfg = compose(*RUN, f"trainer.max_steps={steps}", *extra)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return run(cfg)


def test_a_short_run_with_muon_lowers_the_loss(
    compose_train_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    best = train(compose_train_config, tmp_path, 2 * HALF, "optimizer.warmup_steps=0")
    untrained = json.loads((tmp_path / "run_summary.json").read_text())["untrained_val_loss"]
    assert best < untrained - 0.3, (untrained, best)
    # Muon trained the block matrices: their state is its momentum, the rest AdamW's moments.
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["optimizer_states"][0]["state"]
    kinds = [tuple(sorted(s)) for s in state.values()]
    named = GPTLightningModule.load_from_checkpoint(last).named_parameters()
    n_matrices = sum(n.startswith("model.trf_blocks.") and p.dim() == 2 for n, p in named)
    assert kinds.count(("momentum_buffer",)) == n_matrices
    assert kinds.count(("exp_avg", "exp_avg_sq", "step")) == len(state) - n_matrices > 0


def test_a_resumed_run_trains_as_one_that_never_stopped(
    compose_train_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(compose_train_config, straight, 2 * HALF)
    train(compose_train_config, stopped, HALF)
    train(compose_train_config, stopped, 2 * HALF, f"resume={stopped}")
    expected, resumed = curve(straight, "train/loss"), curve(stopped, "train/loss")
    assert sorted(resumed) == sorted(expected) == list(range(1, 2 * HALF + 1))
    for step in expected:
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed, expected)
    val, expected_val = curve(stopped, "val/loss"), curve(straight, "val/loss")
    assert abs(val[2 * HALF] - expected_val[2 * HALF]) <= 1e-6


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer=fsdp"], "trainer.strategy=ModelParallelStrategy, which shards"),
        (["++trainer.strategy=fsdp"], "trainer.strategy=fsdp, which shards"),
        (["model=bigram"], "model.arch=bigram has none"),
        (["optimizer.muon_momentum=1.0"], "optimizer.muon_momentum=1.0 must be"),
        (["optimizer.muon_adjust_lr=rms"], "optimizer.muon_adjust_lr='rms' must be one of"),
    ],
)
def test_what_muon_cannot_train_is_refused_before_any_data(
    compose_train_config: Callable[..., DictConfig], overrides: list[str], words: str
) -> None:
    cfg = compose_train_config("model=tiny", "optimizer=muon", *overrides)
    with pytest.raises(ConfigError, match=re.escape(words)):
        validate(cfg)


def test_muon_under_fsdp_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    result = run_script(
        "train.py", "model=tiny", "optimizer=muon", "trainer=fsdp", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Newton-Schulz step needs every matrix whole. Use trainer=ddp" in result.stderr
