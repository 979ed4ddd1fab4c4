"""Speed switches: weight tying, vocab padding, GPT-2 init, compile, AdamW groups, FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from conftest import cpu_trainer
from gptlab.errors import ConfigError
from gptlab.inference.generation import generate
from gptlab.model.gpt import GPTConfig, GPTModel, count_parameters
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.flops import (
    measured_flops_per_batch,
    peak_flops,
    tabled_peak_flops,
    training_flops_per_batch,
)
from gptlab.training.module import GPTLightningModule, model_loss, next_token_loss
from gptlab.training.monitor import TrainingMonitor
from gptlab.training.run import build_trainer, validate

GPT124M = {"vocab_size": 50257, "context_length": 256, "drop_rate": 0.1}


def expected_parameters(cfg: GPTConfig, vocab_rows: int) -> int:
    """GPT-2's parameter count from its shapes, written out independently of the model code."""
    d = cfg.emb_dim
    qkv = 3 * (d * d + (d if cfg.qkv_bias else 0))
    block = qkv + d * d + d + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    head = 0 if cfg.tie_weights else d * vocab_rows
    return vocab_rows * d + cfg.context_length * d + cfg.n_layers * block + 2 * d + head


def meta_model(**settings) -> tuple[GPTConfig, GPTModel]:
    cfg = GPTConfig(**settings)
    with torch.device("meta"):
        return cfg, GPTModel(cfg)


@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize("pad_vocab_multiple", [1, 64])
def test_parameter_counts_tied_untied_padded(tie_weights: bool, pad_vocab_multiple: int) -> None:
    cfg, model = meta_model(
        **GPT124M, tie_weights=tie_weights, pad_vocab_multiple=pad_vocab_multiple
    )
    rows = 50304 if pad_vocab_multiple == 64 else 50257
    assert cfg.padded_vocab_size == rows
    assert count_parameters(model) == expected_parameters(cfg, rows)
    assert (model.out_head.weight is model.tok_emb.weight) == tie_weights


def test_gpt124m_default_keeps_the_seed_count() -> None:
    _, model = meta_model(**GPT124M)
    assert count_parameters(model) == 162_419_712


def padded_copy(model: GPTModel, cfg: GPTConfig) -> GPTModel:
    """The same weights in a model whose vocab is padded to 64 rows, pad rows set to win.

    The final norm's shift is large and positive and pad head rows are all ones, so a pad
    logit, wherever it leaked, would beat every real logit in argmax and in sampling.
    """
    with torch.no_grad():
        model.final_norm.bias.fill_(5.0)
    padded = GPTModel(GPTConfig(**{**cfg.to_dict(), "pad_vocab_multiple": 64})).eval()
    state = model.state_dict()
    for name in ("tok_emb.weight", "out_head.weight"):
        rows = padded.state_dict()[name].clone()
        rows[: cfg.vocab_size] = state[name]
        rows[cfg.vocab_size :] = 1.0
        state[name] = rows
    padded.load_state_dict(state)
    return padded


def test_padded_vocab_matches_unpadded_loss_and_never_emits_pad_ids() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=37, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    model = GPTModel(cfg).eval()
    padded = padded_copy(model, cfg)
    assert padded.tok_emb.weight.shape[0] == 64
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    targets = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        logits, padded_logits = model(idx), padded(idx)
    assert padded_logits.shape[-1] == cfg.vocab_size
    with torch.no_grad():
        unsliced = padded.out_head(torch.full((1, cfg.emb_dim), 5.0))
    assert int(unsliced.argmax()) >= cfg.vocab_size, "pad rows must be able to win"
    torch.testing.assert_close(
        next_token_loss(padded_logits, targets), next_token_loss(logits, targets)
    )
    for temperature in (0.0, 1.0):
        out = generate(
            padded, idx[:, :4], 12, context_length=cfg.context_length, temperature=temperature
        )
        assert int(out.max()) < cfg.vocab_size


def test_vocab_mismatch_check_compares_the_real_vocab() -> None:
    tokenizer = CharTokenizer("abc")
    model = {"vocab_size": 3, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1}
    optimizer = {"lr": 1e-3}
    module = GPTLightningModule({**model, "pad_vocab_multiple": 64}, optimizer, tokenizer.to_dict())
    assert module.model.tok_emb.weight.shape[0] == 64
    with pytest.raises(ConfigError, match="vocab_size=64"):
        GPTLightningModule({**model, "vocab_size": 64}, optimizer, tokenizer.to_dict())


def test_gpt2_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, context_length=64, emb_dim=256, n_heads=4, n_layers=8)
    model = GPTModel(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    block = model.trf_blocks[3]
    assert block.att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.att.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.ff.layers[2].weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.count_nonzero(block.ff.layers[0].bias) == 0
    torch_init = GPTModel(GPTConfig(**{**cfg.to_dict(), "init": "torch"}))
    # PyTorch's default Linear init is uniform(+-1/sqrt(fan_in)): std 1/sqrt(3 * 256).
    std = torch_init.trf_blocks[3].att.W_query.weight.std().item()
    assert std == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)


def test_unknown_init_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.init='xavier'"):
        GPTConfig(vocab_size=10, context_length=8, init="xavier")


def tiny_module(compile: bool = False) -> GPTLightningModule:
    model = {"vocab_size": 3, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 2}
    return GPTLightningModule(
        {**model, "tie_weights": True},
        {"lr": 1e-3, "weight_decay": 0.1},
        CharTokenizer("abc").to_dict(),
        compile=compile,
    )


def random_batches(vocab: int = 3, n: int = 8, length: int = 8) -> DataLoader:
    tokens = torch.randint(0, vocab, (n, length + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_weight_decay_only_on_matrices() -> None:
    module = tiny_module()
    trainer = cpu_trainer(Path("."), max_steps=1)
    module.trainer = trainer
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["params"] and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["params"] and all(p.dim() < 2 for p in plain["params"])
    # The tied embedding/head is one tensor, decayed once.
    assert sum(p is module.model.tok_emb.weight for p in decayed["params"]) == 1
    assert len(decayed["params"]) + len(plain["params"]) == len(list(module.parameters()))
    assert optimizer.defaults["fused"], "fused: auto takes torch's CPU kernel too"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_on_cuda() -> None:
    module = tiny_module().cuda()
    module.trainer = cpu_trainer(Path("."), max_steps=1)
    assert module.configure_optimizers()["optimizer"].defaults["fused"]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"tie_weights": True},
        {"tie_weights": True, "pad_vocab_multiple": 64, "qkv_bias": True},
    ],
)
def test_analytic_flops_match_measure_flops(settings: dict) -> None:
    cfg = GPTConfig(vocab_size=1000, context_length=128, emb_dim=96, n_heads=4, n_layers=3)
    cfg = GPTConfig(**{**cfg.to_dict(), **settings})
    analytic = training_flops_per_batch(cfg, 2, 128)
    measured = measured_flops_per_batch(cfg, 2, 128)
    # The formula also counts LayerNorm gains and biases as if they were matmul weights.
    assert analytic == pytest.approx(measured, rel=0.01)
    # A tied head still multiplies: dropping it from the count would be off by 6·V·d per token.
    assert 6 * cfg.padded_vocab_size * cfg.emb_dim * 2 * 128 < 0.5 * analytic


def test_every_run_prints_its_tokens_per_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = TrainingMonitor()
    trainer = cpu_trainer(tmp_path, max_steps=6, callbacks=[monitor], enable_checkpointing=False)
    trainer.fit(tiny_module(), train_dataloaders=random_batches(n=24))
    out = capsys.readouterr().out
    # Timed after the first step (compilation, allocation): 5 steps of 4 windows of 8 tokens.
    assert monitor._timed[1:] == [5 * 4 * 8, 5]
    assert f"{monitor.run_tokens_per_sec:,.0f} tokens/s" in out
    assert "over 5 steps" in out
    assert "MFU" not in out, "a CPU has no known peak, so no MFU may be made up"


def test_a_one_step_run_still_reports_its_tokens_per_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[TrainingMonitor()])
    trainer.fit(tiny_module(), train_dataloaders=random_batches(n=4))
    assert "tokens/s, " in capsys.readouterr().out


def test_fsdp_config_is_fsdp2_over_every_process(compose_train_config) -> None:
    cfg = compose_train_config(
        "model=tiny", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"
    )
    trainer = build_trainer(cfg, validate(cfg)[0])
    assert isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.world_size == 2
    # The untrained model is validated inside fit (Lightning's sanity check), in full.
    assert trainer.num_sanity_val_steps == float("inf")


def test_sharded_checkpoint_folders_are_refused_before_training(compose_train_config) -> None:
    cfg = compose_train_config(
        "model=tiny", "trainer=fsdp", "trainer.strategy.save_distributed_checkpoint=true"
    )
    with pytest.raises(ConfigError, match="save_distributed_checkpoint=true"):
        build_trainer(cfg, validate(cfg)[0])


def test_peak_flops_table_names_the_gpus_people_rent() -> None:
    assert tabled_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert tabled_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert tabled_peak_flops("NVIDIA H100 PCIe", torch.float16) == 756e12
    assert tabled_peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12  # not the L4's
    assert tabled_peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert tabled_peak_flops("NVIDIA H200", torch.float32) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


@pytest.mark.slow
def test_compiled_checkpoint_loads_into_uncompiled_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(compile=True)
    trainer = cpu_trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=random_batches())
    ckpt = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not [key for key in state if "_orig_mod" in key]
    eager = GPTLightningModule.load_from_checkpoint(ckpt, compile=False).eval()
    assert eager.loss_of is model_loss
    idx, targets = torch.tensor([[0, 1, 2, 1]]), torch.tensor([[1, 2, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(eager(idx), module.eval().model(idx))
        compiled = module.loss_of(module.model, idx, targets)
        torch.testing.assert_close(compiled, eager.loss_of(eager.model, idx, targets))


def test_tokens_per_step_reaches_the_trainer(compose_train_config) -> None:
    cfg = compose_train_config(
        "model=tiny", "trainer=cpu", "data.batch_size=8", "tokens_per_step=2048"
    )
    # 2048 tokens per step / (8 windows x 32 tokens x 1 process) = 8 micro-batches.
    assert build_trainer(cfg, validate(cfg)[0]).accumulate_grad_batches == 8
    both = compose_train_config(
        "model=tiny", "trainer=cpu", "tokens_per_step=2048", "trainer.accumulate_grad_batches=2"
    )
    with pytest.raises(ConfigError, match="not both"):
        validate(both)
    with pytest.raises(ConfigError, match="tokens_per_step=1,000"):
        validate(compose_train_config("model=tiny", "tokens_per_step=1000"))
