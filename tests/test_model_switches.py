"""The model group's architecture switches: each alone and all together train, sample, cache,
checkpoint and compile; each does what it says; the defaults stay GPT-2."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, run_script
from gptlab.errors import ConfigError
from gptlab.inference.generation import generate
from gptlab.inference.loading import load_checkpoint, load_initial_weights
from gptlab.model.gpt import (
    GPTConfig,
    GPTModel,
    MultiHeadAttention,
    count_parameters,
    rope_angles,
    rotate,
)
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.module import GPTLightningModule, model_loss
from test_multiprocess import ONE_PROCESS, TWO_PROCESSES, assert_same_losses, train

SIZES = {"vocab_size": 23, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
CHARS = "abcdefghijklmnopqrstuvw"  # SIZES' 23 tokens
ALL_ON = {
    "pos_emb": "rope",
    "rope_base": 500.0,
    "norm": "rmsnorm",
    "qk_norm": True,
    "mlp": "swiglu",
    "bias": False,
    "logit_softcap": 3.0,
    "zero_init_proj": True,
}
SWITCHES = {
    "gpt2": {},
    "rope": {"pos_emb": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "exact_gelu": {"gelu_approximate": "none"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "mlp_hidden": {"mlp": "swiglu", "mlp_hidden": 40},
    "no_bias": {"bias": False},
    "softcap": {"logit_softcap": 3.0},
    "zero_init_proj": {"zero_init_proj": True},
    "all": ALL_ON,
    # The other kinds together, with qkv biases, a tied and padded vocabulary.
    "all_layernorm": {
        **ALL_ON,
        "norm": "layernorm",
        "mlp": "relu2",
        "qkv_bias": True,
        "tie_weights": True,
        "pad_vocab_multiple": 8,
    },
}
# ALL_ON as command-line overrides.
ALL_ON_OVERRIDES = tuple(f"model.{key}={str(value).lower()}" for key, value in ALL_ON.items())
NEW_KEYS = (
    "pos_emb",
    "rope_base",
    "norm",
    "qk_norm",
    "mlp",
    "gelu_approximate",
    "mlp_hidden",
    "bias",
    "logit_softcap",
    "zero_init_proj",
)


def config(**switches) -> GPTConfig:
    return GPTConfig(**{**SIZES, "drop_rate": 0.0, **switches})


def scrambled(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    """A model in eval mode with every parameter drawn at random, so no switch hides behind its
    init (zero projections would make every block the identity)."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def token_ids(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=generator)


def module_of(cfg: GPTConfig) -> GPTLightningModule:
    return GPTLightningModule(cfg, {"lr": 1e-3}, CharTokenizer(CHARS).to_dict())


def save_checkpoint(module: GPTLightningModule, path: Path) -> Path:
    """What a run's checkpoint holds for loading: the weights and the hyperparameters."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_training_steps_reduce_the_loss_and_the_model_samples(switches: dict) -> None:
    torch.manual_seed(0)
    model = GPTModel(config(**switches))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = token_ids(16, batch=4)
    targets = torch.roll(inputs, -1, dims=1)
    losses = []
    for _ in range(25):
        loss = model_loss(model, inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    prompt = token_ids(5, batch=1)
    sampled = generate(model, prompt, 20, num_samples=2, temperature=1.0, top_k=5, seed=0)
    assert sampled.shape == (2, 25)
    assert torch.equal(sampled[:, :5], prompt.expand(2, 5))
    assert int(sampled.min()) >= 0 and int(sampled.max()) < SIZES["vocab_size"]


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_cached_logits_equal_a_full_forward(switches: dict) -> None:
    model = scrambled(config(**switches))
    idx = token_ids(SIZES["context_length"])
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :5], cache), model(idx[:, 5:6], cache), model(idx[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # Greedy decoding past the context: cached steps, then the cropped window recomputed.
    prompt = token_ids(10, batch=2, seed=2)
    cached = generate(model, prompt, 12, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 12, use_cache=False))


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_checkpoint_round_trip_and_init_from(switches: dict, tmp_path: Path) -> None:
    module = module_of(config(**switches))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # not the init a reload draws
    ckpt = save_checkpoint(module, tmp_path / "switches.ckpt")
    idx = token_ids(SIZES["context_length"])
    with torch.no_grad():
        expected = module.model.eval()(idx)
        loaded = load_checkpoint(ckpt)
        assert loaded.config == module.config
        torch.testing.assert_close(loaded.model.eval()(idx), expected, rtol=0, atol=0)
        started = module_of(config(**switches))
        load_initial_weights(started, str(ckpt))
        torch.testing.assert_close(started.model.eval()(idx), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"pos_emb": "learned"}, "pos_emb"),
        ({"rope_base": 10000.0}, "rope_base"),
        ({"norm": "layernorm"}, "norm"),
        ({"qk_norm": False}, "qk_norm"),
        ({"mlp": "gelu", "mlp_hidden": 128}, "mlp"),
        ({"bias": True}, "bias"),
        ({"logit_softcap": None}, "logit_softcap"),
    ],
)
def test_init_from_weights_of_other_switches_is_a_config_error(
    change: dict, key: str, tmp_path: Path
) -> None:
    """Each of these changes what the weights compute; only zero_init_proj, an init, may differ."""
    ckpt = save_checkpoint(module_of(config(**ALL_ON)), tmp_path / "all.ckpt")
    with pytest.raises(ConfigError, match=rf"but model\.{key}="):
        load_initial_weights(module_of(config(**{**ALL_ON, **change})), str(ckpt))
    load_initial_weights(module_of(config(**{**ALL_ON, "zero_init_proj": False})), str(ckpt))


def test_a_checkpoint_from_before_the_switches_loads_as_gpt2(tmp_path: Path) -> None:
    module = module_of(config())
    hparams = dict(module.hparams)
    hparams["model"] = {k: v for k, v in hparams["model"].items() if k not in NEW_KEYS}
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded.config == module.config
    idx = token_ids(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(idx), module.model.eval()(idx))


def test_default_model_has_gpt2s_tensors_and_computes_transformers_logits(tmp_path: Path) -> None:
    """The reference is OpenAI's layout, built by transformers and mapped by pretrained.py."""
    transformers = pytest.importorskip("transformers")
    from gptlab.model.pretrained import gpt2_weights

    hf_config = transformers.GPT2Config(
        vocab_size=23, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    cfg, state = gpt2_weights(str(tmp_path))
    assert {key: getattr(cfg, key) for key in NEW_KEYS} == {
        k: getattr(GPTConfig, k) for k in NEW_KEYS
    }
    model = GPTModel(cfg).eval()
    ours = model.state_dict()
    assert {name: t.shape for name, t in ours.items()} == {n: t.shape for n, t in state.items()}
    model.load_state_dict(state)
    idx = token_ids(16)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def mlp_weights(model: GPTModel) -> int:
    return count_parameters(model.trf_blocks[0].ff)


def test_relu2_and_swiglu_keep_gpt2s_parameter_count() -> None:
    sizes = {**SIZES, "emb_dim": 768, "n_heads": 12, "bias": False}
    with torch.device("meta"):
        gelu, relu2, swiglu = (
            GPTModel(GPTConfig(**sizes, mlp=m)) for m in ("gelu", "relu2", "swiglu")
        )
    assert count_parameters(relu2) == count_parameters(gelu)
    # 8/3 x 768 = 2048 exactly: the same weights as GPT-2's 4x MLP, in three matrices.
    assert swiglu.config.mlp_width == 2048
    assert mlp_weights(swiglu) == mlp_weights(gelu) == 8 * 768**2
    assert count_parameters(swiglu) == count_parameters(gelu)


@pytest.mark.parametrize("emb_dim", [32, 128, 1024, 1600])
def test_swiglu_width_is_the_nearest_multiple_of_8_to_two_thirds_of_gpt2s(emb_dim: int) -> None:
    cfg = GPTConfig(**{**SIZES, "emb_dim": emb_dim, "n_heads": 4}, mlp="swiglu", bias=False)
    width = cfg.mlp_width
    assert width % 8 == 0 and abs(width - 8 * emb_dim / 3) <= 4
    with torch.device("meta"):
        ff = GPTModel(cfg).trf_blocks[0].ff
    # gate and value, then down: three emb_dim x width matrices, within 4 columns of GPT-2's 8 d^2.
    assert count_parameters(ff) == 3 * emb_dim * width
    assert abs(count_parameters(ff) - 8 * emb_dim**2) <= 3 * emb_dim * 4


@pytest.mark.parametrize(
    ("settings", "formula"),
    [
        (
            {"mlp": "gelu"},
            lambda h: 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h**3))),
        ),
        (
            {"mlp": "gelu", "gelu_approximate": "none"},
            lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
        ),
        ({"mlp": "relu2"}, lambda h: torch.relu(h) ** 2),
        ({"mlp": "swiglu"}, lambda h: torch.nn.functional.silu(h[..., :40]) * h[..., 40:]),
    ],
    ids=["gelu", "exact_gelu", "relu2", "swiglu"],
)
def test_each_mlp_computes_its_formula(settings: dict, formula) -> None:
    """With mlp_hidden=40: swiglu's up-projection is 80 wide, gate first, then value."""
    torch.manual_seed(0)
    ff = GPTModel(config(**settings, mlp_hidden=40)).trf_blocks[0].ff
    up, down = ff.layers[0], ff.layers[2]
    x = torch.randn(2, 5, SIZES["emb_dim"])
    with torch.no_grad():
        expected = formula(x @ up.weight.T + up.bias) @ down.weight.T + down.bias
        torch.testing.assert_close(ff(x), expected)


def test_rope_scores_depend_only_on_relative_positions() -> None:
    torch.manual_seed(0)
    cos, sin = rope_angles(config(pos_emb="rope", context_length=64))
    queries, keys = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def scores(q_start: int, k_start: int) -> torch.Tensor:
        q = rotate(queries, cos[q_start : q_start + 8], sin[q_start : q_start + 8])
        k = rotate(keys, cos[k_start : k_start + 8], sin[k_start : k_start + 8])
        return q @ k.transpose(-1, -2)

    torch.testing.assert_close(scores(0, 0), scores(37, 37), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores(3, 0), scores(40, 37), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0, 0), scores(3, 0), atol=1e-2), "positions must matter"
    assert not torch.allclose(scores(0, 0), queries @ keys.transpose(-1, -2), atol=1e-2)
    # fp32 tables turn bf16 queries without promoting them (SDPA needs one dtype for q, k, v).
    assert rotate(queries.bfloat16(), cos[:8], sin[:8]).dtype == torch.bfloat16


def test_rope_attention_is_shift_invariant_and_position_aware() -> None:
    """The attention layer itself, qk_norm included: shifting every position by one constant
    leaves its output unchanged; without the rotation the output differs."""
    cfg = config(pos_emb="rope", qk_norm=True, context_length=64)
    torch.manual_seed(0)
    att = MultiHeadAttention(cfg).eval()
    cos, sin = rope_angles(cfg)
    x = torch.randn(2, 10, cfg.emb_dim)
    with torch.no_grad():
        at_start = att(x, rope=(cos[:10], sin[:10]))
        shifted = att(x, rope=(cos[41:51], sin[41:51]))
        unrotated = att(x)
    torch.testing.assert_close(at_start, shifted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(at_start, unrotated, atol=1e-3)


def test_rope_replaces_the_position_table_and_saves_no_buffers() -> None:
    model = GPTModel(config(pos_emb="rope"))
    assert not hasattr(model, "pos_emb")
    assert not [name for name in model.state_dict() if "pos_emb" in name or "rope" in name]
    assert model.rope_cos.shape == (SIZES["context_length"], SIZES["emb_dim"] // 8)
    learned = GPTModel(config())
    table = SIZES["context_length"] * SIZES["emb_dim"]
    assert count_parameters(learned) - count_parameters(model) == table


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(norm: str) -> None:
    def output(qk_norm: bool, scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        att = MultiHeadAttention(config(norm=norm, qk_norm=qk_norm)).eval()
        with torch.no_grad():
            att.W_query.weight.mul_(scale)
            att.W_key.weight.mul_(scale)
            return att(torch.randn(2, 9, SIZES["emb_dim"]))

    torch.testing.assert_close(output(True, 1.0), output(True, 10.0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(output(False, 1.0), output(False, 10.0), atol=1e-3)


def test_norm_switch_sets_every_norm() -> None:
    model = GPTModel(config(norm="rmsnorm", qk_norm=True))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm)]
    # norm1, norm2, q_norm and k_norm in each of the 2 blocks, and the final norm.
    assert len(norms) == 2 * 4 + 1 and all(isinstance(m, torch.nn.RMSNorm) for m in norms)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_bias_false_leaves_only_qkv_biases(qkv_bias: bool) -> None:
    model = GPTModel(config(bias=False, qk_norm=True, qkv_bias=qkv_bias))
    biases = {name.split(".")[-2] for name, _ in model.named_parameters() if name.endswith("bias")}
    assert biases == ({"W_query", "W_key", "W_value"} if qkv_bias else set())
    with_bias = GPTModel(config(qk_norm=True, qkv_bias=qkv_bias))
    assert {n for n, _ in with_bias.named_parameters() if n.endswith("bias")} > {
        "final_norm.bias",
        "trf_blocks.0.att.out_proj.bias",
        "trf_blocks.0.att.q_norm.bias",
        "trf_blocks.1.ff.layers.2.bias",
    }


def test_logit_softcap_is_c_tanh_of_the_logits_over_c() -> None:
    capped = scrambled(config(logit_softcap=3.0, tie_weights=True, pad_vocab_multiple=8))
    with torch.no_grad():
        capped.out_head.weight.mul_(5.0)  # logits past the cap
    free = GPTModel(dataclasses.replace(capped.config, logit_softcap=None)).eval()
    free.load_state_dict(capped.state_dict())
    idx = token_ids(16)
    with torch.no_grad():
        logits, uncapped = capped(idx), free(idx)
    assert uncapped.abs().max() > 6.0, "the test needs logits the cap bends"
    torch.testing.assert_close(logits, 3.0 * torch.tanh(uncapped / 3.0))
    assert logits.abs().max() <= 3.0
    # The tanh runs in fp32 even in a bf16 model: bf16 would round capped logits by ~0.01.
    with torch.no_grad():
        assert capped.to(torch.bfloat16)(idx).dtype == torch.float32


def test_zero_init_proj_starts_every_block_as_the_identity() -> None:
    torch.manual_seed(0)
    model = GPTModel(config(zero_init_proj=True)).eval()
    for block in model.trf_blocks:
        assert not block.att.out_proj.weight.any() and not block.ff.layers[2].weight.any()
    idx = token_ids(8)
    with torch.no_grad():
        embedded = model.tok_emb(idx) + model.pos_emb(torch.arange(8))
        torch.testing.assert_close(model(idx), model.out_head(model.final_norm(embedded)))
    torch.manual_seed(0)
    gpt2 = GPTModel(config())
    assert gpt2.trf_blocks[0].att.out_proj.weight.std() > 0.001


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = scrambled(config(**ALL_ON)).train()
    inputs = token_ids(16)
    targets = torch.roll(inputs, -1, dims=1)

    def gradients(recompute: bool) -> list[torch.Tensor]:
        model.checkpoint_activations = recompute
        model.zero_grad()
        model_loss(model, inputs, targets).backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, recomputed in zip(gradients(False), gradients(True), strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_bf16_autocast_trains_with_every_switch() -> None:
    model = scrambled(config(**ALL_ON)).train()
    inputs = token_ids(16)
    targets = torch.roll(inputs, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_loss(model, inputs, targets)
    loss.backward()
    assert abs(loss.item() - model_loss(model, inputs, targets).item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow  # compiling forward and backward: ~50 s cold on 2 cores, ~4 s from the cache
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on a CPU needs a C compiler",
)
def test_compiled_loss_equals_eager_with_every_switch() -> None:
    model = scrambled(config(**ALL_ON)).train()
    inputs = token_ids(16)
    targets = torch.roll(inputs, -1, dims=1)
    compiled = torch.compile(model_loss)(model, inputs, targets)
    compiled.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model_loss(model, inputs, targets)
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for got, expected in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pos_emb": "alibi"}, r"model.pos_emb='alibi' is unknown: use 'learned' or 'rope'"),
        ({"norm": "batchnorm"}, r"model.norm='batchnorm' is unknown: use 'layernorm' or"),
        ({"mlp": "geglu"}, r"model.mlp='geglu' is unknown: use 'gelu', 'relu2' or 'swiglu'"),
        ({"gelu_approximate": "erf"}, r"model.gelu_approximate='erf' is unknown: use 'tanh' or"),
        ({"qk_norm": "yes"}, r"model.qk_norm='yes' must be true or false"),
        ({"bias": 1}, r"model.bias=1 must be true or false"),
        ({"zero_init_proj": None}, r"model.zero_init_proj=None must be true or false"),
        ({"mlp_hidden": 0}, r"model.mlp_hidden=0 must be a positive integer"),
        ({"rope_base": 0.0}, r"model.rope_base=0.0 must be a positive number"),
        ({"logit_softcap": -30.0}, r"model.logit_softcap=-30.0 must be a positive number"),
        ({"logit_softcap": float("inf")}, r"model.logit_softcap=inf must be a positive number"),
        (
            {"pos_emb": "rope", "emb_dim": 36, "n_heads": 4},
            r"model.pos_emb=rope .* 36 / 4 = 9 dimensions is odd",
        ),
        (
            {"zero_init_proj": True, "init": "torch"},
            r"model.zero_init_proj=true .* set model.init=gpt2",
        ),
    ],
)
def test_bad_switches_are_config_errors_naming_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**SIZES, **change})


@pytest.mark.slow  # one script start-up
def test_a_run_with_every_switch_trains_validates_checkpoints_and_samples(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        *TINY_RUN,
        *ALL_ON_OVERRIDES,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.precision=bf16-mixed",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert {key: getattr(module.config, key) for key in ALL_ON} == ALL_ON
    assert "Best val loss" in result.stdout


@pytest.mark.slow  # a run on one process and one on two: about 25 s
def test_fsdp_with_every_switch_trains_as_one_process(tmp_path: Path) -> None:
    """FSDP2 shards each block (RoPE's tables stay whole in the root) and recomputes the
    activations: the same losses as one process training the same global batches."""
    settings = (*ALL_ON_OVERRIDES, "model.activation_checkpointing=true", "trainer.max_steps=4")
    train(tmp_path / "one", *ONE_PROCESS, *settings)
    train(tmp_path / "two", *TWO_PROCESSES, *settings, strategy="fsdp")
    assert_same_losses(tmp_path / "two", tmp_path / "one", range(1, 5))
