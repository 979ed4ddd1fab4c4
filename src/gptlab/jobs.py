"""A run as a Hydra job: whether it is one job of a sweep, its folder's name, and the
keys its sweep varies (`sweep.json`), shown as its HParams columns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gptlab.atomic import atomic_write_text
from gptlab.overrides import as_number, parse_overrides, run_name, split_override

log = logging.getLogger(__name__)


# The keys a sweep varies, written when it starts, read to name its jobs.
SWEEP_FILE = "sweep.json"


MAX_JOB_NAME = 120


def in_multirun() -> bool:
    """Whether this is one job of a Hydra sweep (`-m`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_swept_keys(sweep_dir: Path, keys: Sequence[str]) -> None:
    """Record which keys a sweep varies, for its jobs' names (see `job_subdir`)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(sweep_dir) / SWEEP_FILE, json.dumps({"swept": list(keys)}) + "\n")


def swept_keys(sweep_dir: Path) -> list[str]:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text())["swept"] if path.is_file() else []


def sweep_definition_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: command-line sweeps (`a=1,2`, `range(...)`) and the
    sweeper's `params` (grid values, or an Optuna search space)."""
    overrides = parse_overrides(config.hydra.overrides.task)
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    fixed = {o.key_or_group for o in overrides if not o.is_sweep_override()}
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([*keys, *(k for k in params if k not in fixed)]))


def job_subdir(sweep_dir: str, number: int, overrides: Sequence[str]) -> str:
    """A sweep job's directory name, `<number>-<run name>`, which TensorBoard shows as the
    run's name; filesystem-safe and at most MAX_JOB_NAME characters."""
    name = run_name(list(overrides), swept_keys(Path(sweep_dir)))
    name = "".join(c if c.isalnum() or c in "=,._+-" else "_" for c in name)[:MAX_JOB_NAME]
    return f"{number}-{name}" if name else str(number)


def swept_hparams() -> dict[str, float | str]:
    """This sweep job's values of the keys its sweep varies, as HParams columns (`optimizer/lr`);
    none outside a sweep."""
    if not in_multirun():
        return {}
    hydra = HydraConfig.get()
    given = dict(split_override(o) for o in hydra.overrides.task)
    return {
        key.replace(".", "/"): given[key]
        if as_number(given[key]) is None
        else as_number(given[key])
        for key in swept_keys(Path(hydra.sweep.dir))
        if key in given
    }
