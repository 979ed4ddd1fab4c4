"""Every key of every config group is typed and ranged: a wrong type, a bad value or a key
nothing reads is one ConfigError naming the key (exit 2 from the commands), before any data.

The keys are walked from the schemas themselves (dataclass fields, the callbacks' and the
Trainer's arguments as the composed config holds them), so a key added later is walked too.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig

from conftest import CONF_DIR
from gptlab.data.datamodule import CorpusSpec, LoaderSettings
from gptlab.errors import ConfigError
from gptlab.model.gpt import GPTConfig
from gptlab.schema import conforms, init_parameters
from gptlab.training.loggers import passed_on
from gptlab.training.optim import OptimizerSettings
from gptlab.training.run import build_trainer, validate
from gptlab.training.settings import ModelUse, RunKeys

BASE = ("model=tiny", "trainer=cpu")
# Every logger of conf/logger/ at once (`many` is a set of them), so their keys are walked too.
LOGGERS = sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml") if p.stem != "many")
EVERY_LOGGER = f"logger=[{','.join(LOGGERS)}]"

# A value out of range for each key whose type alone does not rule it out.
BAD_VALUES = {
    "model.vocab_size": "0",
    "model.context_length": "0",
    "model.emb_dim": "0",
    "model.n_heads": "-1",
    "model.n_layers": "0",
    "model.drop_rate": "1.0",
    "model.pad_vocab_multiple": "0",
    "model.arch": "transformer",
    "model.init": "xavier",
    "model.tokenizer": "bpe",
    "model.lr": "0",
    "model.compile_mode": "fastest",
    "model.pos_emb": "alibi",
    "model.rope_base": "0",
    "model.norm": "batchnorm",
    "model.mlp": "geglu",
    "model.mlp_hidden": "0",
    "model.logit_softcap": "-30.0",
    "data.batch_size": "0",
    "data.stride": "0",
    "data.train_ratio": "1.0",
    "data.num_workers": "-1",
    "data.source": "ftp",
    "data.windows": "sliding",
    "optimizer.lr": "-1e-3",
    "optimizer.weight_decay": "-0.1",
    "optimizer.betas": "[0.9,1.5]",
    "optimizer.schedule": "linear",
    "optimizer.warmup_steps": "-1",
    "optimizer.min_lr": "-1",
    "optimizer.muon_lr": "0",
    "optimizer.muon_momentum": "1.0",
    "optimizer.muon_weight_decay": "-0.1",
    "trainer.max_steps": "0",
    "trainer.max_epochs": "0",
    "trainer.val_check_interval": "0",
    "trainer.limit_val_batches": "0",
    "trainer.log_every_n_steps": "0",
    "trainer.gradient_clip_val": "-1",
    "trainer.accumulate_grad_batches": "0",
    "trainer.devices": "0",
    "trainer.precision": "8-mixed",
    "trainer.accelerator": "quantum",
    "seed": "-1",
    "max_new_tokens": "-1",
    "optimized_metric": "train/loss",
    "tokens_per_step": "1000",
    "callbacks.checkpoint.every_n_steps": "0",
    "callbacks.cpu_cost.timed_steps": "0",
    "callbacks.sample_text.top_k": "0",
    "callbacks.sample_text.temperature": "-1",
    "callbacks.sample_text.max_new_tokens": "-1",
}


# Override texts and the values Hydra parses them to.
WRONG_TYPES = {"abc": "abc", "[1,2]": [1, 2]}


def wrong_type(hint: object) -> str | None:
    """An override of a type `hint` rejects (a word, or a list where text is meant), or None
    where `hint` takes either."""
    return next((text for text, value in WRONG_TYPES.items() if not conforms(value, hint)), None)


def group_keys(cfg: DictConfig) -> dict[str, object]:
    """Every key of every group, with its type hint."""
    keys: dict[str, object] = {}
    schemas = [
        ("model", GPTConfig),
        ("model", ModelUse),
        ("data", CorpusSpec),
        ("data", LoaderSettings),
        ("optimizer", OptimizerSettings),
        ("", RunKeys),
    ]
    for group, schema in schemas:
        hints = typing.get_type_hints(schema)
        for field in dataclasses.fields(schema):
            if group == "optimizer" and field.name == "tokens_per_step":
                continue  # a top-level key, walked with RunKeys
            keys[f"{group}.{field.name}" if group else field.name] = hints[field.name]
    trainer = init_parameters(get_class("lightning.pytorch.Trainer"))
    for key in cfg.trainer:
        keys[f"trainer.{key}"] = trainer[key]
    for name, node in cfg.callbacks.items():
        arguments = init_parameters(get_class(node._target_))
        for key in node:
            if not key.startswith("_"):
                keys[f"callbacks.{name}.{key}"] = arguments[key]
    for name, node in cfg.logger.items():
        target = get_class(node._target_)
        arguments = init_parameters(target, passed_on(target))
        for key in node:
            if not key.startswith("_"):
                keys[f"logger.{name}.{key}"] = arguments[key]
    return keys


@pytest.fixture
def check(compose_train_config: Callable[..., DictConfig]) -> Callable[..., str]:
    """The message of the ConfigError raised for overrides where a run checks its config,
    before any data: `validate`, then building the Trainer, its callbacks and loggers."""

    def _check(*overrides: str) -> str:
        cfg = compose_train_config(*BASE, *overrides)
        with pytest.raises(ConfigError) as err:
            build_trainer(cfg, validate(cfg)[0])
        return str(err.value)

    return _check


def test_every_key_of_every_group_refuses_a_wrong_type(
    compose_train_config: Callable[..., DictConfig], check: Callable[[str], str]
) -> None:
    keys = group_keys(compose_train_config(*BASE))
    assert len(keys) > 60
    for key, hint in keys.items():
        if key == "trainer.default_root_dir":
            continue  # a path takes any text; gptlab sets it to the run directory
        # Lightning types some keys loosely (str or an Accelerator object): gptlab's own
        # check of the value must then catch a word that is no setting.
        value = wrong_type(hint) or "abc"
        message = check(f"++{key}={value}")  # ++: set, whether the preset has the key or not
        assert message.startswith(f"{key}="), (key, message)


def test_every_ranged_key_refuses_a_bad_value(
    compose_train_config: Callable[..., DictConfig], check: Callable[[str], str]
) -> None:
    keys = group_keys(compose_train_config(*BASE))
    numeric = {
        key
        for key, hint in keys.items()
        if (conforms(1, hint) and not conforms("abc", hint) and "." in key) or key in RUN_NUMBERS
    }
    assert numeric <= set(BAD_VALUES) | NO_RANGE, sorted(numeric - set(BAD_VALUES) - NO_RANGE)
    for key, value in BAD_VALUES.items():
        message = check(f"++{key}={value}")
        assert key in message, (key, message)


# Numbers any value of which is a legal setting.
NO_RANGE = {
    "callbacks.progress_bar.refresh_rate",  # 0 turns the bar off
    "callbacks.sample_text.seed",
    "callbacks.checkpoint.save_top_k",  # -1 keeps all, 0 none
    "trainer.check_val_every_n_epoch",  # null by gptlab: steps count across epochs
}
RUN_NUMBERS = {"seed", "max_new_tokens", "tokens_per_step"}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+foo=1", "foo is not a top-level setting"),
        ("+model.foo=1", "model.foo is not a model setting"),
        ("+data.foo=1", "data.foo is not a data setting"),
        ("+optimizer.foo=1", "optimizer.foo is not an optimizer setting"),
        ("+trainer.foo=1", "trainer.foo is not an argument of Trainer"),
        ("+callbacks.checkpoint.foo=1", "callbacks.checkpoint.foo is not an argument of"),
        ("+callbacks.final_validation.foo=1", "callbacks.final_validation.foo is not an"),
        # TensorBoardLogger hands the keys it does not take to SummaryWriter.
        ("+logger.tensorboard.foo=1", "logger.tensorboard.foo is not an argument of"),
    ],
)
def test_a_key_nothing_reads_is_refused(check: Callable[[str], str], override: str, named: str):
    assert named in check(override)


def needs_logger_extras() -> None:
    """Every logger at once needs the packages of gptlab's mlflow and wandb extras."""
    for module, extra in (("mlflow", "mlflow"), ("sqlalchemy", "mlflow"), ("wandb", "wandb")):
        pytest.importorskip(module, reason=f'needs the {extra} extra: pip install -e ".[{extra}]"')


def test_every_key_of_every_logger_refuses_a_wrong_type(
    compose_train_config: Callable[..., DictConfig], check: Callable[..., str]
) -> None:
    needs_logger_extras()
    keys = group_keys(compose_train_config(*BASE, EVERY_LOGGER))
    logger_keys = {key: hint for key, hint in keys.items() if key.startswith("logger.")}
    assert {key.split(".")[1] for key in logger_keys} == set(LOGGERS)
    for key, hint in logger_keys.items():
        message = check(EVERY_LOGGER, f"++{key}={wrong_type(hint) or 'abc'}")
        assert message.startswith(f"{key}="), (key, message)


@pytest.mark.parametrize("name", ["csv", "mlflow", "wandb"])
def test_a_key_no_logger_reads_is_refused(check: Callable[..., str], name: str) -> None:
    needs_logger_extras()
    # WandbLogger hands the keys it does not take to wandb.init, which takes no others.
    message = check(EVERY_LOGGER, f"+logger.{name}.foo=1")
    assert f"logger.{name}.foo is not an argument of" in message
