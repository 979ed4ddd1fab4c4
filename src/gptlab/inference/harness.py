"""lm-evaluation-harness tasks on a checkpoint or GPT-2 weights: `gptlab-evaluate tasks=...`.

Everything that can be wrong with the request (lm-eval missing, a task name it does not know, a
task whose data cannot be loaded) is reported before the model is loaded. lm-eval is optional
(`pip install -e ".[eval]"`), so it is imported here only inside the functions that need it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from gptlab.atomic import atomic_write_text
from gptlab.checks import check_count, is_count, is_number
from gptlab.errors import ConfigError
from gptlab.inference.loading import load_model
from gptlab.training.settings import resolve_device

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[eval]"'
# Longer joined task names are replaced by a digest in the results file's name.
MAX_TASKS_IN_NAME = 80


def requested_tasks(tasks: Any) -> list[str]:
    """Task names from `tasks=`: a name, a comma-separated string or a list of either."""
    items = list(tasks) if isinstance(tasks, ListConfig | list | tuple) else [tasks]
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(
            f"tasks={tasks!r} must be task names: a name (tasks=hellaswag) or a list of them "
            f"(tasks=[hellaswag,lambada_openai])."
        )
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if not names:
        raise ConfigError(
            f"tasks={tasks!r} names no task: give one, e.g. tasks=hellaswag, or tasks=null to "
            f"score text_file= or data= instead."
        )
    return names


def check_harness_config(cfg: DictConfig) -> list[str]:
    """The task names `cfg` asks for, once its other harness settings are checked and lm-eval
    is known to import."""
    names = requested_tasks(cfg.tasks)
    if cfg.text_file or cfg.get("data") is not None:
        raise ConfigError(
            f"tasks={cfg.tasks!r} runs lm-evaluation-harness tasks, which bring their own text: "
            f"leave out text_file= and data=, or set tasks=null to score that text instead."
        )
    limit = cfg.limit
    if limit is not None and not (
        (is_count(limit) and limit >= 1) or (is_number(limit) and 0 < limit < 1)
    ):
        raise ConfigError(
            f"limit={limit!r} must be a whole number of examples per task >= 1, a fraction of "
            f"them between 0 and 1 (e.g. 0.1), or null for all of them."
        )
    if cfg.num_fewshot is not None:
        check_count(
            "num_fewshot",
            cfg.num_fewshot,
            0,
            " (examples in each prompt), or null for each task's own",
        )
    check_count("batch_size", cfg.batch_size, 1)
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(
            f"include_path={cfg.include_path!r} is not a folder (searched from {Path.cwd()}): "
            f"give the folder that holds your task YAMLs, e.g. include_path=tests/lm_eval_tasks."
        )
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"tasks={cfg.tasks!r} needs EleutherAI's lm-evaluation-harness, which cannot be "
            f"imported ({type(err).__name__}: {err}): install it with gptlab's eval extra, "
            f"{INSTALL_HINT} (or pip install lm-eval), or set tasks=null to score text_file= or "
            f"data= without it."
        ) from None
    return names


def unknown_task_message(unknown: str, known: Sequence[str], include_path: str | None) -> str:
    close = difflib.get_close_matches(unknown, known, n=3)
    maybe = f"Did you mean {', '.join(close)}? " if close else ""
    where = f" and in include_path={include_path!r}" if include_path else ""
    return (
        f"tasks: {unknown!r} is not a task, group or tag of lm-evaluation-harness{where}. {maybe}"
        f"`lm-eval ls tasks` lists them (add --include_path <folder> for your own); a task of your "
        f"own is a YAML file in a folder you name with include_path=<folder>."
    )


def load_tasks(names: list[str], include_path: str | None) -> tuple[Any, list[Any]]:
    """The harness's task manager and the tasks and groups `names` ask for (glob patterns such
    as `mmlu_*` allowed), with their data loaded: all before any model is."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    matched: list[str] = []
    for name in names:
        found = manager.match_tasks([name])
        if not found:
            raise ConfigError(unknown_task_message(name, manager.all_tasks, include_path))
        matched += [task for task in found if task not in matched]
    tasks = []
    for name in matched:
        try:
            loaded = manager.load([name])
        except Exception as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
            raise ConfigError(
                f"tasks: {name!r} could not load its data ({type(err).__name__}: {detail}). The "
                f"harness downloads a task's dataset from the Hugging Face hub the first time; "
                f"offline (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1) it must already be in the "
                f"datasets cache. Run once with the network, or evaluate a local task "
                f"(include_path=<folder of task YAMLs>)."
            ) from None
        groups = loaded.get("groups", {})
        tasks += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return manager, tasks


def results_path(source: str, from_checkpoint: bool, names: list[str]) -> Path:
    """Where the results JSON goes: `lm_eval-<model>-<tasks>.json` beside the checkpoint, or in
    the current folder for GPT-2 weights (a hub id or a folder of their own)."""
    tasks = "+".join(re.sub(r"[^\w.-]+", "_", name) for name in names)
    if len(tasks) > MAX_TASKS_IN_NAME:
        tasks = f"{len(names)}-tasks-{hashlib.sha256(tasks.encode()).hexdigest()[:10]}"
    model = Path(source)
    folder = model.parent if from_checkpoint else Path.cwd()
    return folder / f"lm_eval-{model.stem}-{tasks}.json"


def evaluate_tasks(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.tasks` on the model `cfg` names, print the harness's table, write its results
    JSON and return the results."""
    names = check_harness_config(cfg)
    device = resolve_device(cfg.device)
    manager, tasks = load_tasks(names, cfg.include_path)
    loaded = load_model(cfg.ckpt, cfg.pretrained, cfg.paths.log_dir)
    path = results_path(loaded.source, bool(cfg.ckpt), names)
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(
            f"The results go to {path}, but {path.parent} is not writable: run from a folder you "
            f"can write (for pretrained=), or copy the checkpoint to one and evaluate the copy."
        )

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from gptlab.inference.harness_model import GPTLabLM

    model = GPTLabLM(loaded.model.to(device), loaded.tokenizer, cfg.batch_size, loaded.source)
    log.info("Evaluating %s on %s on %s", loaded.source, ", ".join(names), device)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
    print(f"Results: {path}")
    return results
