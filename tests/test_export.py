"""gptlab-export: the folder transformers loads computes gptlab's logits, encodes text to
gptlab's ids and continues a prompt as gptlab does; bad input is one paragraph and leaves
nothing behind."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_RUN, needs_tiktoken, run_script
from gptlab.errors import ConfigError, StorageError
from gptlab.export.huggingface import (
    LLAMA,
    QWEN3,
    Architecture,
    check_exportable,
    export_checkpoint,
)
from gptlab.export.tokenizer import write_tokenizer
from gptlab.inference.generation import generate
from gptlab.inference.loading import load_checkpoint
from gptlab.model.gpt import GPTConfig
from gptlab.model.pretrained import load_gpt2
from gptlab.model.tokenizers import CharTokenizer, GPT2Tokenizer
from gptlab.training.checkpoints import find_best_checkpoint
from gptlab.training.module import GPTLightningModule
from gptlab.training.records import read_run_record

transformers = pytest.importorskip("transformers")

EXPORTED_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
}
# Characters of a small char vocabulary that covers the prompt, with whitespace and non-ASCII.
CHARS = "Every effort moves you, and then: naïve → 日本 🙂!\n\t"
PROMPT = "Every effort moves you"
TRICKY_TEXTS = [
    "Hello world",
    "  two leading spaces, trailing spaces  ",
    "line one\n\nline three\r\n\ttabbed\n",
    "naïve café — “quotes” 日本語 emoji 🙂👍🏽 \u00a0no-break \u200bzero-width",
    "one<|endoftext|>two <|endoftext|>\n<|endoftext|>",
    "don't I'll we've THEY'RE 1234567 3.14159 $x_1 + x^2$ 5€ ¬ ÿ",
    "spaced , out . marks ! and ? it 's n't",
    "    def main():\n        return {'a': [1, 2]}\n",
    "x" * 300,
    "",
]
# The recipes LlamaForCausalLM computes, and Qwen3ForCausalLM with qk_norm.
LLAMA_RECIPE = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
QWEN3_RECIPE = {**LLAMA_RECIPE, "qk_norm": True}
# The speedrun's recipe (conf/recipe/modern.yaml): Qwen3's but for the MLP and the logits.
MODERN_RECIPE = {**QWEN3_RECIPE, "mlp": "relu2", "logit_softcap": 30.0, "zero_init_proj": True}


def saved_checkpoint(folder: Path, tokenizer: dict, std: float = 0.3, **model) -> Path:
    """A checkpoint of a model with every weight random and O(1) (normal, `std`), so a wrong
    mapping shows."""
    sizes = {"context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
    module = GPTLightningModule({**sizes, **model}, {"lr": 1e-3}, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std)
    path = folder / "model.ckpt"
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**saved, "global_step": 7}, path)
    return path


def char_checkpoint(folder: Path, std: float = 0.3, **model) -> Path:
    chars = "".join(sorted(set(CHARS)))
    return saved_checkpoint(
        folder, {"name": "char", "chars": chars}, std, vocab_size=len(chars), **model
    )


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)


@pytest.mark.parametrize(
    "layout",
    [
        {"tie_weights": True, "qkv_bias": False},
        {"tie_weights": False, "qkv_bias": True},
        {"tie_weights": True, "qkv_bias": True, "pad_vocab_multiple": 8},
        {"tie_weights": False, "qkv_bias": False, "pad_vocab_multiple": 8, "drop_rate": 0.1},
        {"tie_weights": False, "qkv_bias": False, "gelu_approximate": "none"},
    ],
    ids=["tied", "untied-qkv_bias", "tied-padded", "untied-padded-dropout", "exact-gelu"],
)
def test_gpt2lmheadmodel_gives_gptlabs_logits(tmp_path: Path, layout: dict) -> None:
    ckpt = char_checkpoint(tmp_path, **layout)
    out = export_checkpoint(str(ckpt), str(tmp_path / "hf"), tmp_path)
    assert {p.name for p in out.iterdir()} == EXPORTED_FILES
    ours = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    config = ours.config
    assert hf.config.vocab_size == config.vocab_size, "padded rows are not tokens"
    assert hf.config.n_positions == config.context_length
    assert hf.config.tie_word_embeddings == config.tie_weights
    dropout = (hf.config.resid_pdrop, hf.config.embd_pdrop, hf.config.attn_pdrop)
    assert dropout == (config.drop_rate,) * 3
    with safe_open(out / "model.safetensors", "pt") as weights:
        saved = set(weights.keys())
    assert ("lm_head.weight" in saved) == (not config.tie_weights)
    ids = ours.tokenizer.encode(CHARS[: config.context_length])
    expected = logits_of(ours.model, ids)
    assert (logits_of(hf, ids) - expected).abs().max() < 1e-5
    # gptlab's own GPT-2 reader takes the folder back: the two mappings are inverses.
    assert (logits_of(load_gpt2(str(out)), ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("architecture", "layout"),
    [
        (LLAMA, {"tie_weights": True, "rope_base": 500.0}),
        (LLAMA, {"tie_weights": False, "pad_vocab_multiple": 8, "mlp_hidden": 24}),
        (QWEN3, {"tie_weights": True, "pad_vocab_multiple": 8, "drop_rate": 0.1}),
        (QWEN3, {"tie_weights": False, "rope_base": 500.0, "zero_init_proj": True}),
    ],
    ids=["llama-tied", "llama-untied-padded", "qwen3-tied-padded", "qwen3-untied"],
)
def test_llama_and_qwen3_give_gptlabs_logits(
    tmp_path: Path, architecture: Architecture, layout: dict
) -> None:
    recipe = QWEN3_RECIPE if architecture is QWEN3 else LLAMA_RECIPE
    ckpt = char_checkpoint(tmp_path, **recipe, **layout)
    out = export_checkpoint(str(ckpt), str(tmp_path / "hf"), tmp_path)
    assert {p.name for p in out.iterdir()} == EXPORTED_FILES
    ours = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == architecture.model_class
    config = ours.config
    assert hf.config.vocab_size == config.vocab_size, "padded rows are not tokens"
    assert hf.config.max_position_embeddings == config.context_length
    assert hf.config.tie_word_embeddings == config.tie_weights
    assert hf.config.intermediate_size == config.mlp_width
    assert hf.config.rope_parameters["rope_theta"] == config.rope_base
    with safe_open(out / "model.safetensors", "pt") as weights:
        saved = set(weights.keys())
    assert ("lm_head.weight" in saved) == (not config.tie_weights)
    assert ("model.layers.0.self_attn.q_norm.weight" in saved) == config.qk_norm
    ids = ours.tokenizer.encode(CHARS[: config.context_length])
    assert (logits_of(hf, ids) - logits_of(ours.model, ids)).abs().max() < 1e-5
    card = (out / "README.md").read_text()
    assert f"as a `{architecture.model_class}`" in card
    assert f"- {architecture.model_type}\n" in card


@needs_tiktoken
def test_gpt2_bpe_gives_tiktokens_ids(tmp_path: Path) -> None:
    import pydoc_data.topics

    import tokenizers

    write_tokenizer(GPT2Tokenizer(), 1024, tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # tokenizer.json alone, as other tools (text-generation-inference, converters) read it.
    standalone = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = GPT2Tokenizer()
    corpus = "\n".join(pydoc_data.topics.topics.values())  # CPython's docs: 465k characters
    for text in [*TRICKY_TEXTS, corpus]:
        ids = exported(text)["input_ids"]
        assert ids == ours.encode(text), text[:80]
        assert exported.decode(ids) == text, text[:80]
        assert standalone.encode(text).ids == ids, text[:80]
    assert exported.eos_token_id == exported.bos_token_id == ours.eot_id


def test_char_tokenizer_gives_gptlabs_ids(tmp_path: Path) -> None:
    ours = CharTokenizer(CHARS + "\r\u00a0<|>")
    write_tokenizer(ours, 64, tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Every effort", " \n\n\t naïve → 日本 🙂 ", "you , then !", "<|>\r\n", ours.chars, ""]
    for text in texts:
        ids = exported(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert exported.decode(ids) == text, text
    with pytest.raises(Exception, match="UNK"):  # no unknown token, as gptlab has none
        exported("q")


@pytest.mark.parametrize(
    ("tokenizer", "recipe"),
    [
        ("char", {}),
        pytest.param("gpt2", {}, marks=needs_tiktoken),
        ("char", LLAMA_RECIPE),
        ("char", QWEN3_RECIPE),
    ],
    ids=["char", "gpt2", "char-llama", "char-qwen3"],
)
def test_pipeline_greedy_text_is_gptlabs(tmp_path: Path, tokenizer: str, recipe: dict) -> None:
    if tokenizer == "char":
        # Weights of std 1: at 0.3, the RMSNorm models repeat one token.
        ckpt = char_checkpoint(tmp_path, std=1.0, context_length=32, **recipe)
    else:
        ckpt = saved_checkpoint(tmp_path, {"name": "gpt2"}, vocab_size=50257, tie_weights=True)
    out = export_checkpoint(str(ckpt), str(tmp_path / "hf"), tmp_path)
    ours = load_checkpoint(ckpt)
    prompt = ours.tokenizer.encode(PROMPT)
    new_tokens = ours.config.context_length - len(prompt)
    ids = generate(ours.model, torch.tensor([prompt]), new_tokens, eos_id=ours.tokenizer.eot_id)
    expected = ours.tokenizer.decode(ids[0].tolist())
    assert len(set(ids[0, len(prompt) :].tolist())) > 2, "a continuation that tells models apart"
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out))
    assert pipe.model.generation_config.eos_token_id == ours.tokenizer.eot_id  # stops where we do
    generated = pipe(PROMPT, max_new_tokens=new_tokens, do_sample=False)
    assert generated[0]["generated_text"] == expected


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose outputs/ holds one tiny trained run, exported by the script with
    `ckpt=best out=hf` from that folder."""
    workdir = tmp_path_factory.mktemp("export")
    run_dir = workdir / "outputs" / "2026-12-06" / "10-00-00"
    trained = run_script("train.py", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_script("export.py", "ckpt=best", "out=hf", cwd=workdir)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout == "Wrote hf: AutoModelForCausalLM.from_pretrained('hf') loads it\n"
    return workdir


def test_script_exports_the_best_checkpoint(workdir: Path) -> None:
    ours = load_checkpoint(find_best_checkpoint(workdir / "outputs"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    text = "def main():\n    return {'a': 1}  # “done”"[: ours.config.context_length]
    ids = tokenizer(text)["input_ids"]
    assert ids == ours.tokenizer.encode(text)
    assert (logits_of(hf, ids) - logits_of(ours.model, ids)).abs().max() < 1e-5


def test_model_card_says_how_it_was_trained_and_runs_as_written(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best = find_best_checkpoint(workdir / "outputs")
    card = (workdir / "hf" / "README.md").read_text()
    ours = load_checkpoint(best)
    saved = torch.load(best, weights_only=True)
    model, optimizer = saved["hyper_parameters"]["model"], saved["hyper_parameters"]["optimizer"]
    assert str(best.relative_to(workdir)) in card
    assert f"emb_dim: {model['emb_dim']}\n" in card
    assert f"context_length: {model['context_length']}\n" in card
    assert f"lr: {optimizer['lr']}\n" in card
    assert "source: pydocs\n" in card
    assert f"batch_size: {saved['GPTDataModule']['loader']['batch_size']}\n" in card
    record = read_run_record(best.parent.parent)
    assert f"completed, best val loss {record.best_val_loss:.4f} over {record.steps} steps" in card
    step = int(re.search(r"best-step(\d+)", best.name).group(1))
    loss = record.best_val_loss
    assert f"- Best val loss {loss:.4f} (perplexity {math.exp(loss):.2f}) at step {step}.\n" in card
    assert f"Saved at optimizer step {saved['global_step']}," in card
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    prompt, new_tokens = re.search(r'generate\((".*?"), max_new_tokens=(\d+)', snippet).groups()
    prompt = json.loads(prompt)
    assert len(ours.tokenizer.encode(prompt)) + int(new_tokens) <= model["context_length"]
    monkeypatch.chdir(workdir)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith(prompt) and len(printed) == len(prompt) + int(new_tokens) + 1


SIZES = {"vocab_size": 5, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1}


def test_recipes_pick_their_architecture() -> None:
    assert check_exportable(GPTConfig(**SIZES, **LLAMA_RECIPE), "run.ckpt") is LLAMA
    assert check_exportable(GPTConfig(**SIZES, **QWEN3_RECIPE), "run.ckpt") is QWEN3


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"arch": "bigram"}, ["model.arch='bigram' (GPT-2: 'gpt')"]),
        ({**LLAMA_RECIPE, "mlp": "relu2"}, ["model.mlp='relu2' (Llama: 'swiglu')"]),
        ({**LLAMA_RECIPE, "logit_softcap": 30.0}, ["model.logit_softcap=30.0 (Llama: None)"]),
        ({**LLAMA_RECIPE, "norm": "layernorm"}, ["model.norm='layernorm' (Llama: 'rmsnorm')"]),
        ({**LLAMA_RECIPE, "qkv_bias": True}, ["model.qkv_bias=True (Llama: False)"]),
        ({"pos_emb": "rope"}, ["model.pos_emb='rope' (GPT-2: 'learned')"]),
        ({"qk_norm": True}, ["model.qk_norm=True (GPT-2: False)"]),
        (
            MODERN_RECIPE,
            ["model.mlp='relu2' (Qwen3: 'swiglu')", "model.logit_softcap=30.0 (Qwen3: None)"],
        ),
    ],
    ids=["bigram", "relu2", "softcap", "rope-layernorm", "qkv_bias", "rope", "qk_norm", "modern"],
)
def test_settings_no_architecture_has_are_named(model: dict, named: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        check_exportable(GPTConfig(**SIZES, **model), "run.ckpt")
    message = str(raised.value)
    assert f"'run.ckpt' has {', '.join(named)}, which" in message
    assert "LlamaForCausalLM (pos_emb=rope, norm=rmsnorm, mlp=swiglu, bias=false" in message


def test_a_new_switch_is_refused_until_mapped() -> None:
    @dataclasses.dataclass
    class ConfigWithASwitch(GPTConfig):
        a_new_switch: bool = False

    check_exportable(ConfigWithASwitch(**SIZES), "run.ckpt")
    with pytest.raises(ConfigError, match=r"model.a_new_switch=True \(GPT-2: False\)"):
        check_exportable(ConfigWithASwitch(**SIZES, a_new_switch=True), "run.ckpt")
    with pytest.raises(ConfigError, match=r"model.a_new_switch=True \(Llama: False\)"):
        check_exportable(ConfigWithASwitch(**SIZES, **LLAMA_RECIPE, a_new_switch=True), "run.ckpt")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = char_checkpoint(tmp_path)

    def disk_full(model, folder, *args, **kwargs) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "save_pretrained", disk_full)
    out = tmp_path / "new" / "deeper" / "hf"
    with pytest.raises(StorageError, match="No space left on device.*nothing was left there"):
        export_checkpoint(str(ckpt), str(out), tmp_path)
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


def bigram_checkpoint(folder: Path) -> Path:
    return saved_checkpoint(folder, {"name": "char", "chars": "abc"}, vocab_size=3, arch="bigram")


BAD_INPUTS = {
    "out-not-empty": (
        lambda d: (char_checkpoint(d), d / "hf"),
        lambda d: [f"out='{d / 'hf'}' is a folder that is not empty (it holds 'notes.txt')"],
    ),
    "out-a-file": (
        lambda d: (char_checkpoint(d), d / "notes.txt"),
        lambda d: [f"out='{d / 'notes.txt'}' is a file"],
    ),
    "ckpt-missing": (
        lambda d: (d / "missing.ckpt", d / "hf"),
        lambda d: [f"ckpt='{d / 'missing.ckpt'}' is not a file"],
    ),
    "bigram": (
        lambda d: (bigram_checkpoint(d), d / "hf"),
        lambda d: ["model.arch='bigram' (GPT-2: 'gpt')", "the nearest architecture"],
    ),
    "modern": (
        lambda d: (char_checkpoint(d, **MODERN_RECIPE), d / "hf"),
        lambda d: ["model.mlp='relu2' (Qwen3: 'swiglu')", "Qwen3ForCausalLM (pos_emb=rope"],
    ),
    "no-transformers": (
        lambda d: (char_checkpoint(d), d / "hf"),
        lambda d: ["transformers, which cannot be imported", "pip install transformers"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_paragraph_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    arguments, words = BAD_INPUTS[case]
    (tmp_path / "notes.txt").write_text("mine")
    if case == "out-not-empty":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "notes.txt").write_text("mine")
    if case == "no-transformers":  # as Python sees a package that is not installed
        monkeypatch.setitem(sys.modules, "transformers", None)
    ckpt, out = arguments(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as raised:
        export_checkpoint(str(ckpt), str(out), tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    for word in words(tmp_path):
        assert word in message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_script_reports_bad_input_with_exit_code_2(tmp_path: Path) -> None:
    ckpt = bigram_checkpoint(tmp_path)
    result = run_script("export.py", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ckpt=") and result.stderr.count("\n") == 1
    assert "model.arch='bigram'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
