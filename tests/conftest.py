"""Shared fixtures: offline assets, Hydra config composition, and running the real scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from gptlab.data.datamodule import GPTDataModule
from gptlab.runs import register_resolvers

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED_DIR = REPO_ROOT.parent / "shared"
TIKTOKEN_CACHE = SHARED_DIR / "tiktoken-cache"
SHARED_DATA = SHARED_DIR / "data"

# Nothing may reach the network: tiktoken and corpora come from ../shared when it exists.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
if SHARED_DATA.is_dir():
    os.environ.setdefault("GPTLAB_DATA_DIR", str(SHARED_DATA))

# As gptlab's commands do before Hydra composes a config.
register_resolvers()

needs_tiktoken = pytest.mark.skipif(
    not TIKTOKEN_CACHE.is_dir(),
    reason=f"GPT-2 BPE files are not available offline: {TIKTOKEN_CACHE} is missing",
)
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"test corpora are not available offline: {SHARED_DATA} is missing",
)


@pytest.fixture
def compose_train_config(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose conf/train.yaml with overrides, as scripts/train.py would, writing under tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path)
        return cfg

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield _compose
    GlobalHydra.instance().clear()


def script_env(changes: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment for running scripts/*: this checkout's gptlab, short error messages,
    and `changes` (None unsets a variable)."""
    env = dict(os.environ)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")])
    )
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_script(
    script: str,
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run scripts/<script> in a fresh interpreter, importing this checkout's gptlab."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
        cwd=cwd or REPO_ROOT,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TINY_RUN = (
    "model=tiny",
    "data.batch_size=8",
    "trainer=cpu",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=4",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "max_new_tokens=10",
)
"""Overrides for a run that trains the tiny model for a few seconds on pydocs."""


def cpu_trainer(tmp_path: Path, **options) -> L.Trainer:
    """A Trainer for in-process tests: CPU, no logger, progress bar or model summary."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **options,
    )


def make_datamodule(tokenizer: str = "gpt2", context_length: int = 256, **data) -> GPTDataModule:
    """A data module from `data` group keys, connected to a model's tokenizer and context."""
    return GPTDataModule.from_config({"source": "pydocs", **data}).connect(
        tokenizer, context_length
    )


def job_dir(sweep_dir: Path, number: int | str) -> Path:
    """A sweep job's directory, `<number>-<what it varies>`, by its number."""
    found = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.split("-")[0] == str(number)]
    assert len(found) == 1, f"job {number} in {sweep_dir}: {found}"
    return found[0]


def model_preset(name: str) -> dict:
    """A `conf/model/<name>.yaml` preset as composed (its defaults applied), resolved."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.model, resolve=True)
