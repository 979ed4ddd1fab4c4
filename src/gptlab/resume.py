"""Continuing a run: which directory and checkpoint it continues from, and whether they fit.

`conf/hydra/default.yaml` calls `gptlab.run_dir` and `gptlab.config_subdir` (registered when
this module is imported, which `gptlab.cli` does) so that `resume=<run dir>` or
`ckpt_path=<run dir>/checkpoints/last.ckpt` writes into the same run directory: the TensorBoard
curves continue, and the first run's `.hydra/` record is kept while each resume records its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gptlab.errors import ConfigError
from gptlab.tokenizers import Tokenizer

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Settings that may change on resume without changing the weights' shapes.
SHAPE_NEUTRAL_KEYS = {"drop_rate"}


def continued_run_dir(resume: str | None, ckpt_path: str | None) -> Path | None:
    """The existing run directory a resume writes into, or None for a fresh run directory."""
    if resume:
        run_dir = Path(resume).expanduser()
        return run_dir if run_dir.is_dir() else None
    if ckpt_path:
        ckpt = Path(ckpt_path).expanduser()
        run_dir = ckpt.parent.parent
        if ckpt.parent.name == CHECKPOINT_DIR and (run_dir / ".hydra").is_dir():
            return run_dir
    return None


def hydra_run_dir(resume: str | None, ckpt_path: str | None, fresh: str) -> str:
    run_dir = continued_run_dir(resume, ckpt_path)
    return fresh if run_dir is None else str(run_dir)


def hydra_config_subdir(resume: str | None, ckpt_path: str | None, stamp: str) -> str:
    """`.hydra` for a fresh run; `.hydra/resume-<time>` when continuing one, so its record stays."""
    return ".hydra" if continued_run_dir(resume, ckpt_path) is None else f".hydra/resume-{stamp}"


OmegaConf.register_new_resolver("gptlab.run_dir", hydra_run_dir, replace=True)
OmegaConf.register_new_resolver("gptlab.config_subdir", hydra_config_subdir, replace=True)


def checkpoint_to_resume(resume: str | None, ckpt_path: str | None) -> str | None:
    """The checkpoint `resume=<run dir>` or `ckpt_path=<file>` names; errors say how to fix them."""
    if resume and ckpt_path:
        raise ConfigError(
            f"resume={resume!r} and ckpt_path={ckpt_path!r} are both set: give only one "
            f"(resume=<run dir> continues from <run dir>/{CHECKPOINT_DIR}/{LAST_CHECKPOINT})."
        )
    if resume:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            raise ConfigError(
                f"resume={resume!r} is not a directory: give the run directory that holds "
                f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}, e.g. resume=outputs/2026-11-22/10-00-00."
            )
        last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not last.is_file():
            raise ConfigError(
                f"resume={resume!r} has no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}: the run saved no "
                f"checkpoint yet; start a new run, or pass ckpt_path=<file> for another checkpoint."
            )
        return str(last)
    if ckpt_path:
        if not Path(ckpt_path).expanduser().is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} is not a file: give a .ckpt to resume, e.g. "
                f"ckpt_path=<run dir>/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}, or resume=<run dir>."
            )
        return str(Path(ckpt_path).expanduser())
    return None


def read_checkpoint_settings(path: str) -> dict[str, Any]:
    """A checkpoint's hyperparameters, read without loading its tensors into memory."""
    import torch

    others = sorted(p.name for p in Path(path).parent.glob("*.ckpt") if p != Path(path))
    fix = (
        f"resume from another checkpoint with ckpt_path=<file>"
        f"{' (there: ' + ', '.join(others) + ')' if others else ''}, or start a new run."
    )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"Checkpoint {path} cannot be read ({reason}): it is "
            f"corrupt or truncated, e.g. copied before it was complete; {fix}"
        ) from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "model" not in hparams or "name" not in hparams.get("tokenizer", {}):
        raise ConfigError(
            f"Checkpoint {path} has no gptlab model and tokenizer settings in its "
            f"hyper_parameters: it was not written by gptlab's train.py; {fix}"
        )
    return hparams


def check_checkpoint_fits(path: str, model: dict[str, Any]) -> None:
    """The checkpoint's model must have the shapes and tokenizer the config asks for."""
    hparams = read_checkpoint_settings(path)
    saved = dict(hparams["model"], tokenizer=hparams["tokenizer"]["name"])
    for key, value in model.items():
        if key in SHAPE_NEUTRAL_KEYS or key not in saved or value is None:
            continue
        if saved[key] != value:
            raise ConfigError(
                f"Checkpoint {path} was trained with model.{key}={saved[key]!r}, but the config "
                f"has model.{key}={value!r}: resume with the checkpoint's model settings "
                f"(model.{key}={saved[key]!r}), or start a new run without ckpt_path/resume."
            )


def check_checkpoint_tokenizer(path: str, tokenizer: Tokenizer) -> None:
    """A char vocabulary is rebuilt from the corpus on resume; it must be the saved one."""
    saved = read_checkpoint_settings(path)["tokenizer"]
    if saved != tokenizer.to_dict():
        raise ConfigError(
            f"Checkpoint {path} was trained with a {saved['name']} tokenizer of "
            f"{len(saved.get('chars', '')) or 'another'} tokens built from its corpus, but this "
            f"run's data gives a different {tokenizer.name} vocabulary "
            f"({tokenizer.vocab_size} tokens), so token ids would mean other characters: "
            f"resume with the data settings of the original run."
        )
