"""Every shipped config composes and validates; gpt124m really trains through the script."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import CONF_DIR, needs_shared_data, needs_tiktoken, run_script
from gptlab.data.corpus import SOURCES, CorpusSpec
from gptlab.data.datamodule import LoaderSettings
from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.checkpoints import (
    ARCHITECTURE_FIELDS,
    LAYOUT_FIELDS,
    TRAINING_ONLY_FIELDS,
    SavedRun,
)
from gptlab.training.run import build_trainer, validate
from gptlab.training.settings import ModelUse, resolve_precision

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if not p.stem.startswith("_"))
DATA = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if not p.stem.startswith("_"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


@needs_tiktoken
@pytest.mark.parametrize("model", MODELS)
def test_model_configs_validate(compose_train_config, model: str) -> None:
    validate(compose_train_config(f"model={model}"))


@pytest.mark.parametrize("data", DATA)
def test_data_configs_hold_corpus_and_loader_keys_only(compose_train_config, data: str) -> None:
    cfg = compose_train_config(f"data={data}")
    assert cfg.data.source in SOURCES
    # The tokenizer and the context length are the model's, given at connect().
    assert set(cfg.data) <= set(CorpusSpec.key_names()) | set(LoaderSettings.key_names())


@needs_tiktoken
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_validate(compose_train_config, experiment: str) -> None:
    validate(compose_train_config(f"experiment={experiment}"))


def changed_settings(cfg: DictConfig, baseline: DictConfig) -> set[str]:
    """The model and optimizer keys whose values differ from the baseline's."""
    return {
        f"{group}.{key}"
        for group in ("model", "optimizer")
        for key in cfg[group]
        if cfg[group][key] != baseline[group].get(key)
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_sets_its_switches_on_the_classic_model(compose_train_config, recipe: str):
    classic = compose_train_config("experiment=shakespeare_char_cpu", "recipe=classic")
    cfg = compose_train_config("experiment=shakespeare_char_cpu", f"recipe={recipe}")
    validate(cfg)
    changed = changed_settings(cfg, classic)
    # The experiment's own settings (width, schedule) survive every recipe.
    assert cfg.model.emb_dim == 128 and cfg.optimizer.schedule == "cosine"
    assert bool(changed) == (recipe != "classic"), changed
    assert not {key for key in changed if key.split(".")[1] in ("emb_dim", "lr", "schedule")}


@pytest.mark.parametrize("experiment", ["shakespeare_char_cpu", "shakespeare_char"])
def test_nanogpts_presets_are_gpt2_without_biases_as_nanogpt_trains(
    compose_train_config, experiment: str
) -> None:
    """nanoGPT's train.py sets bias = False; recipe=classic is GPT-2 with its biases."""
    preset = compose_train_config(f"experiment={experiment}")
    classic = compose_train_config(f"experiment={experiment}", "recipe=classic")
    assert changed_settings(preset, classic) == {"model.bias"}
    assert preset.model.bias is False


@pytest.mark.parametrize("model", MODELS)
def test_callbacks_instantiate_for_every_model(compose_train_config, model: str) -> None:
    # The hparams callback reads model sizes the bigram table does not have.
    cfg = compose_train_config(f"model={model}")
    assert all(instantiate(c) is not None for c in cfg.callbacks.values())


def test_default_callbacks_and_logger_instantiate(compose_train_config, tmp_path: Path) -> None:
    cfg = compose_train_config()
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    assert callbacks["checkpoint"].monitor == "val/loss"
    assert callbacks["checkpoint"].every_n_steps == 100
    logger = instantiate(cfg.logger.tensorboard)
    assert Path(logger.log_dir) == tmp_path, "events in the run directory, named after it"


def test_auto_precision_is_full_fp32_without_a_gpu() -> None:
    expected = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    assert resolve_precision("auto", "auto") in (expected, "32-true")
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"


@pytest.mark.slow
@needs_tiktoken
@needs_shared_data
def test_gpt124m_trains_a_step_through_the_script(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "model=gpt124m",
        "data=verdict",
        "data.batch_size=1",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "max_new_tokens=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "162,419,712 parameters" in output
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be a whole number >= 1"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
        (["trainer.val_check_interval=2.0"], "trainer.val_check_interval=2.0"),
        (
            ["optimizer.schedule=cosine", "trainer.max_steps=-1", "trainer.max_epochs=-1"],
            "needs a finite run",
        ),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1"),
        (["max_new_tokens=-1"], "max_new_tokens=-1"),
    ],
)
def test_run_settings_are_checked_before_any_data(
    compose_train_config, overrides: list[str], words: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        validate(compose_train_config(*overrides))


def test_resume_refuses_a_char_vocabulary_from_other_data(tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    saved = {"model": {"vocab_size": 3}, "tokenizer": CharTokenizer("abc").to_dict()}
    torch.save({"state_dict": {}, "hyper_parameters": saved}, checkpoint)
    SavedRun.read(checkpoint).check_tokenizer(CharTokenizer("abc"))
    with pytest.raises(ConfigError, match="3 tokens built from its corpus"):
        SavedRun.read(checkpoint).check_tokenizer(CharTokenizer("abd"))


@pytest.mark.parametrize(
    ("max_steps", "interval", "every"),
    [
        (150, "auto", 15),
        (20, "auto", 2),
        (1000, "auto", 100),
        (5000, "auto", 250),
        (150, 250, 150),
        (300, 7, 7),
    ],
)
def test_short_runs_get_a_curve_of_validations_and_are_never_refused_for_their_interval(
    compose_train_config, max_steps: int, interval: str | int, every: int
) -> None:
    cfg = compose_train_config(
        "model=tiny", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={interval}"
    )
    settings, _ = validate(cfg)
    assert settings.trainer.val_every == every


def test_a_callbacks_bad_setting_is_a_config_error_not_hydras(compose_train_config) -> None:
    cfg = compose_train_config("model=tiny", "trainer=cpu", "callbacks.checkpoint.every_n_steps=0")
    with pytest.raises(ConfigError, match=r"^callbacks.checkpoint.every_n_steps=0 must be"):
        build_trainer(cfg, validate(cfg)[0])


@pytest.mark.parametrize("model", [m for m in MODELS if m != "bigram"])
def test_every_gpt_model_preset_holds_every_model_key(compose_train_config, model: str) -> None:
    """README's `model.tie_weights=true` must work on every GPT preset: Hydra refuses to set
    a key the composed preset lacks ("not in struct") unless it is written `+model.`."""
    keys = {f.name for schema in (GPTConfig, ModelUse) for f in dataclasses.fields(schema)}
    assert keys <= set(compose_train_config(f"model={model}").model)


def test_every_model_field_says_whether_a_checkpoint_must_match_it() -> None:
    # A new GPTConfig field must be placed in one class, or resumes would ignore it unseen.
    classes = (ARCHITECTURE_FIELDS, LAYOUT_FIELDS, TRAINING_ONLY_FIELDS)
    classified = [name for fields in classes for name in fields]
    assert sorted(classified) == sorted(f.name for f in dataclasses.fields(GPTConfig))


def test_enable_progress_bar_false_alone_turns_the_bar_off(compose_train_config) -> None:
    cfg = compose_train_config("model=tiny", "trainer.enable_progress_bar=false")
    settings, _ = validate(cfg)
    trainer = build_trainer(cfg, settings)
    assert trainer.progress_bar_callback is None


def test_checkpoint_null_alone_turns_checkpoints_off(compose_train_config) -> None:
    """Without gptlab's callback Lightning would add its own, saving `epoch=<n>-step=<n>.ckpt`
    at every epoch's end: for GPT-2 small on pydocs, a 1.8 GiB write every few steps."""
    cfg = compose_train_config("model=tiny", "callbacks.checkpoint=null")
    settings, _ = validate(cfg)
    assert build_trainer(cfg, settings).checkpoint_callbacks == []


def test_resume_with_another_optimizer_is_refused_before_any_data(
    compose_train_config, tmp_path: Path
) -> None:
    """A checkpoint's optimizer state fits only the optimizer that wrote it (AdamW's groups are
    not Muon-and-AdamW's): PyTorch's error would come at the first step, as a traceback."""
    checkpoint = tmp_path / "last.ckpt"
    cfg = compose_train_config("model=tiny", "optimizer=muon")
    saved = {
        "model": saved_model(cfg),
        "tokenizer": {"name": "char"},
        "optimizer": {"name": "adamw"},
    }
    torch.save({"state_dict": {}, "hyper_parameters": saved}, checkpoint)
    with pytest.raises(ConfigError, match="trained with optimizer=adamw, but the config has"):
        validate(cfg, SavedRun.read(checkpoint))
    validate(compose_train_config("model=tiny"), SavedRun.read(checkpoint))


@pytest.mark.parametrize(
    ("changes", "overrides", "named"),
    [
        ({"logit_softcap": 30.0}, [], "model.logit_softcap=30.0"),
        # Saved before the switch existed (None: left out): trained with its default.
        ({"pos_emb": None}, ["model.pos_emb=rope"], "model.pos_emb='learned'"),
    ],
    ids=["switched-off", "older-checkpoint"],
)
def test_resume_compares_every_switch_with_the_checkpoints(
    compose_train_config, tmp_path: Path, changes: dict, overrides: list[str], named: str
) -> None:
    checkpoint = tmp_path / "last.ckpt"
    cfg = compose_train_config("model=tiny", *overrides)
    saved = {"model": saved_model(cfg, **changes), "tokenizer": {"name": "char"}}
    torch.save({"state_dict": {}, "hyper_parameters": saved}, checkpoint)
    with pytest.raises(ConfigError, match=re.escape(f"was trained with {named}")):
        validate(cfg, SavedRun.read(checkpoint))


def saved_model(cfg: DictConfig, **changes: object) -> dict:
    """The GPTConfig fields of cfg's model, as its checkpoints hold them; None leaves one out."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = {key: value for key, value in cfg.model.items() if key in fields}
    return {key: value for key, value in {**model, **changes}.items() if value is not None}
