"""GPT-2 weights in Hugging Face format: logits equal transformers' own, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import needs_shared_data, needs_tiktoken, run_script
from gptlab.errors import ConfigError
from gptlab.inference.generation import generate
from gptlab.inference.loading import (
    find_initial_weights,
    load_checkpoint,
    load_initial_weights,
    load_model,
)
from gptlab.model.gpt import GPTConfig, GPTModel
from gptlab.model.pretrained import gpt2_weights, load_gpt2, resolve_weights
from gptlab.training.module import GPTLightningModule

transformers = pytest.importorskip("transformers")

GPT2_TINY = {"vocab_size": 50257, "n_embd": 16, "n_positions": 16, "n_layer": 2, "n_head": 2}


def random_gpt2(seed: int = 0, **sizes) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel with every tensor random and O(1), so a wrong mapping shows."""
    settings = {"vocab_size": 64, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
    settings.update(sizes)
    config = transformers.GPT2Config(
        **settings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def hf_logits(model: transformers.GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPTModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def random_ids(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(3))


def test_safetensors_folder_gives_the_same_logits(tmp_path: Path) -> None:
    hf = random_gpt2()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_gpt2(str(tmp_path))
    assert ours.config == GPTConfig(
        vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
        qkv_bias=True,
    )  # fmt: skip
    idx = random_ids(64, 16)
    expected = hf_logits(hf, idx)
    assert expected.abs().max() > 1.0, "logits large enough for the comparison to mean something"
    assert (our_logits(ours, idx) - expected).abs().max() < 1e-4


def test_pytorch_bin_in_openai_layout_gives_the_same_logits(tmp_path: Path) -> None:
    """OpenAI's own files: no `transformer.` prefix, causal-mask buffers, the head repeated,
    and here no config.json, so the head count comes from GPT-2's 64-dimensional heads."""
    hf = random_gpt2(seed=1, n_embd=128, n_head=2, n_layer=1)
    state = {key.removeprefix("transformer."): value for key, value in hf.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"]
    state["h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_gpt2(str(tmp_path / "pytorch_model.bin"))
    assert ours.config.n_heads == 2
    idx = random_ids(64, 12)
    assert (our_logits(ours, idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_folder_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    random_gpt2().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    assert resolve_weights(str(tmp_path)) == tmp_path / "model.safetensors"


def test_greedy_decoding_matches_transformers_generate(tmp_path: Path) -> None:
    hf = random_gpt2(n_positions=32)
    hf.save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 9, 2]])
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
    )
    assert torch.equal(generate(load_gpt2(str(tmp_path)), prompt, 20), expected)


def test_missing_sources_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "nowhere" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"folder without model\.safetensors"):
        resolve_weights(str(tmp_path))
    with pytest.raises(ConfigError, match="could be downloaded"):
        resolve_weights("no-such-org/no-such-gpt2")  # the tests run with HF_HUB_OFFLINE=1


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights_are_config_errors(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x00garbage, perhaps an interrupted download")
    with pytest.raises(ConfigError, match="corrupt or incomplete"):
        gpt2_weights(str(tmp_path))


def test_weights_of_another_model_are_a_config_error(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="not a GPT-2 checkpoint"):
        gpt2_weights(str(tmp_path))


def test_missing_and_corrupt_lightning_checkpoints_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        load_checkpoint(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"")
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ConfigError, match="not a gptlab checkpoint"):
        load_checkpoint(foreign)


@needs_tiktoken
def test_generate_script_samples_from_gpt2_weights(gpt2_vocab_folder: Path) -> None:
    from gptlab.model.tokenizers import GPT2Tokenizer

    result = run_script(
        "generate.py", f"pretrained={gpt2_vocab_folder}", "max_new_tokens=8", "stop_at_eot=false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = GPT2Tokenizer()
    prompt = torch.tensor([tokenizer.encode("Every effort moves you")])
    expected = generate(load_gpt2(str(gpt2_vocab_folder)), prompt, 8)
    assert result.stdout == tokenizer.decode(expected[0].tolist()) + "\n"


@needs_tiktoken
@needs_shared_data
def test_train_script_starts_from_gpt2_weights(gpt2_vocab_folder: Path, tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "model=gpt2",
        "model.emb_dim=16",
        "model.n_heads=2",
        "model.n_layers=2",
        "model.context_length=16",
        f"init_from={gpt2_vocab_folder}",
        "data=verdict",
        "data.batch_size=4",
        "optimizer.lr=1e-9",
        "optimizer.weight_decay=0",
        "trainer=cpu",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=2",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "max_new_tokens=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt").model
    _, pretrained = gpt2_weights(str(gpt2_vocab_folder))
    vocab_size = trained.config.vocab_size
    assert trained.config.padded_vocab_size > vocab_size, "model=gpt2 pads its vocabulary"
    for name, tensor in trained.state_dict().items():
        expected = pretrained[name]
        # Padding rows past the real vocabulary exist only in the padded model.
        real = tensor[:vocab_size] if name in ("tok_emb.weight", "out_head.weight") else tensor
        torch.testing.assert_close(real, expected, rtol=0, atol=1e-6, msg=name)


def test_init_from_names_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"init_from='.*run\.ckpt' is not a file"):
        find_initial_weights(str(tmp_path / "run.ckpt"))
    with pytest.raises(ConfigError, match="does not exist"):
        find_initial_weights(str(tmp_path / "gpt2-folder" / "model.safetensors"))


@pytest.mark.parametrize(("ckpt", "pretrained"), [(None, None), ("last", "gpt2")])
def test_scripts_need_exactly_one_model(tmp_path: Path, ckpt, pretrained) -> None:
    with pytest.raises(ConfigError, match="exactly one model"):
        load_model(ckpt, pretrained, tmp_path)


@pytest.fixture(scope="module")
def gpt2_vocab_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with GPT-2's 50,257-token vocabulary, so the BPE tokenizer fits."""
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    random_gpt2(**GPT2_TINY).save_pretrained(folder)
    return folder


def gptlab_module(tokenizer: dict, **model) -> GPTLightningModule:
    return GPTLightningModule(model=model, optimizer={"lr": 1e-3}, tokenizer=tokenizer)


def tiny_gpt2_module(**changes) -> GPTLightningModule:
    sizes = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2}
    settings = {**sizes, "n_layers": 2, "qkv_bias": True, **changes}
    return gptlab_module({"name": "gpt2"}, **settings)


@needs_tiktoken
def test_init_from_keeps_the_first_positions_for_a_shorter_context(
    gpt2_vocab_folder: Path,
) -> None:
    module = tiny_gpt2_module(context_length=8)
    load_initial_weights(module, str(gpt2_vocab_folder))
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_vocab_folder).eval()
    assert torch.equal(module.model.pos_emb.weight, hf.transformer.wpe.weight[:8])
    idx = random_ids(50257, 8)
    assert (our_logits(module.model.eval(), idx) - hf_logits(hf, idx)).abs().max() < 1e-4


@needs_tiktoken
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"emb_dim": 32}, "model.emb_dim=32"),
        ({"qkv_bias": False}, "model.qkv_bias=False"),
        ({"context_length": 32}, "model.context_length=32 is longer"),
    ],
)
def test_init_from_a_different_architecture_is_a_config_error(
    gpt2_vocab_folder: Path, change: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_initial_weights(tiny_gpt2_module(**change), str(gpt2_vocab_folder))


def test_init_from_a_checkpoint_with_another_vocabulary_is_a_config_error(tmp_path: Path) -> None:
    """Same size, other characters: the ids would silently mean other letters."""
    sizes = {"vocab_size": 3, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1}
    source = gptlab_module({"name": "char", "chars": "abc"}, **sizes)
    ckpt = tmp_path / "abc.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, ckpt)
    target = gptlab_module({"name": "char", "chars": "abc"}, **sizes)
    load_initial_weights(target, str(ckpt))
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="char tokenizer on another corpus"):
        load_initial_weights(gptlab_module({"name": "char", "chars": "abd"}, **sizes), str(ckpt))


def test_gpt2_variants_gptmodel_cannot_compute_are_refused(tmp_path: Path) -> None:
    hf = random_gpt2()
    hf.config.scale_attn_by_inverse_layer_idx = True
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx=True"):
        load_gpt2(str(tmp_path))
