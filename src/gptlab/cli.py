"""gptlab's commands (`gptlab-train`, `gptlab-generate`, ...): each composes its config and
calls the package; a reported error becomes one paragraph and an exit code.

`scripts/*.py` call these too, so a checkout runs without installing the commands.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

# Only the standard library and gptlab.errors here: the rest (torch, Lightning, Hydra) is
# imported by the commands, inside the block where Ctrl-C ends them with one line.
from gptlab.errors import ConfigError, StorageError, TrainingInterrupted, exit_with_message

if TYPE_CHECKING:
    from omegaconf import DictConfig

T = TypeVar("T")

# conf/paths/default.yaml's log_dir, where runs go unless paths.log_dir says otherwise.
DEFAULT_LOG_DIR = "outputs"
# A disk with less room than this cannot hold a run's first files (its config, a checkpoint).
MIN_FREE_BYTES = 1 << 20
STOPPED_BEFORE_TRAINING = "Stopped by Ctrl-C before training started"
# Errors whose message is the whole report: no traceback, the error's own exit code.
REPORTED_ERRORS = (ConfigError, StorageError)

log = logging.getLogger(__name__)


def exit_on_reported_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print a reported error as its message alone and exit with its code.

    `HYDRA_FULL_ERROR=1` shows the stack instead. In a Hydra multirun the error is logged
    and re-raised: Hydra then records that one job as failed and runs the others, where
    `sys.exit` would end the whole sweep. An interrupt (Ctrl-C, SIGTERM) ends the sweep too,
    with the way to resume.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except REPORTED_ERRORS as err:
            from gptlab.jobs import in_multirun

            if in_multirun():
                log.error("%s", err)
                raise
            exit_with_message(err)
        except TrainingInterrupted as stop:
            print(stop, file=sys.stderr)
            sys.exit(stop.exit_code)

    return wrapper


def conf_dir() -> str:
    """The config folder: packaged inside gptlab by a wheel install, the checkout's `conf/`
    in a source tree or editable install."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def expose_hydra_plugins() -> None:
    """Let Hydra find gptlab's sweeper after `pip install -e`: Hydra lists plugins with pkgutil,
    which cannot look inside setuptools' editable-install finder, but sees a folder on sys.path.
    A regular install has that folder (site-packages) on sys.path already."""
    spec = importlib.util.find_spec("hydra_plugins.gptlab_optuna_sweeper")
    if spec is None or spec.origin is None:
        return
    root = str(Path(spec.origin).parents[2])
    if root not in sys.path:
        sys.path.append(root)


def hydra_command(
    config_name: str,
    task: Callable[[DictConfig], T],
    owns_run_dir: bool = False,
    stopped: str = "Stopped by Ctrl-C.",
) -> Callable[[], T | None]:
    """A console command: Hydra composes `conf/<config_name>.yaml` with the command line.

    `owns_run_dir`: the command writes a run directory (`conf/hydra/default.yaml`). Where it
    goes is checked before Hydra starts, and the task runs holding the directory, which is
    written to only once it is held (`gptlab.runs.owned`). `stopped`: the line Ctrl-C prints
    before the task handles it itself (while Python imports torch, say); it exits with 130.
    """

    def command() -> T | None:
        try:
            import hydra

            from gptlab.overrides import quote_path_values
            from gptlab.runs import register_resolvers
            from gptlab.training.console import quiet_lightning

            expose_hydra_plugins()
            register_resolvers()
            quiet_lightning()
            sys.argv[1:] = exit_on_reported_error(quote_path_values)(sys.argv[1:])
            exit_on_reported_error(check_run_location)(sys.argv[1:], owns_run_dir)
            body = owning_run_dir(task) if owns_run_dir else exit_on_reported_error(task)
            main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)
            result = main(body)()
            # The process exits next. Its last garbage collections would walk every object of
            # torch, Lightning and their imports (about 0.8 s) to free memory the OS takes back
            # anyway; exit handlers still run, and every file is closed by now.
            gc.freeze()
            return result
        except KeyboardInterrupt:
            print(stopped, file=sys.stderr)
            sys.exit(128 + signal.SIGINT)

    command.__doc__ = task.__doc__
    return command


def owning_run_dir(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """The task, run while this process holds the Hydra job's directory. Its errors are
    reported while the directory is held, so that a sweep job's reach the job's log file."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        from hydra.core.hydra_config import HydraConfig

        from gptlab.runs import owned

        with contextlib.ExitStack() as held:
            claim = owned(Path(HydraConfig.get().runtime.output_dir), cfg)
            exit_on_reported_error(held.enter_context)(claim)
            return exit_on_reported_error(task)(cfg)

    return wrapper


def check_run_location(arguments: list[str], writes: bool) -> None:
    """Where a command puts its runs must be a folder it can write, with room: checked before
    Hydra creates or writes anything there, which would otherwise end in a traceback.

    `writes`: the command writes a run directory; generate and evaluate only read runs from
    `paths.log_dir`, which must then still be a folder.
    """
    from gptlab.overrides import parse_overrides
    from gptlab.runs import continued_run_dir

    overrides = parse_overrides([a for a in arguments if "=" in a and not a.startswith("-")])
    given = {
        o.key_or_group: str(o.value())
        for o in overrides
        if not o.is_sweep_override() and o.value() is not None
    }
    log_dir = Path(given.get("paths.log_dir", DEFAULT_LOG_DIR)).expanduser()
    blocking = next((p for p in (log_dir, *log_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(
            f"paths.log_dir={str(log_dir)!r} cannot be a folder: {blocking} is a file. Give a "
            f"folder for the runs, e.g. paths.log_dir=outputs."
        )
    if not writes:
        return
    multirun = any(a in ("-m", "--multirun") for a in arguments) or (
        "hparams_search" in given or given.get("hydra.mode") == "MULTIRUN"
    )
    continued = continued_run_dir(given.get("resume"), given.get("ckpt_path"))
    if multirun and "hydra.sweep.dir" in given:
        key, place = "hydra.sweep.dir", Path(given["hydra.sweep.dir"])
    elif not multirun and "hydra.run.dir" in given:
        key, place = "hydra.run.dir", Path(given["hydra.run.dir"])
    elif not multirun and continued is not None:
        key, place = ("resume" if given.get("resume") else "ckpt_path"), continued
    else:
        key, place = "paths.log_dir", log_dir
    problem = unwritable_place(place.expanduser())
    if problem is None:
        return
    fix = f"Give a folder you can write, e.g. {key}=<folder>."
    if key in ("resume", "ckpt_path"):
        fix = (
            f"A resumed run writes into its own directory: copy it to a writable place "
            f"(cp -r {place} <copy>) and resume the copy, resume=<copy>."
        )
    raise ConfigError(f"{key}={given.get(key, str(place))!r} cannot be written: {problem}. {fix}")


def unwritable_place(place: Path) -> str | None:
    """Why nothing can be created at `place` (the nearest folder of it that exists is read-only,
    not writable by this user, or on a full disk), or None."""
    folder = next((p for p in (place, *place.parents) if p.is_dir()), None)
    if folder is None:
        return None
    statvfs = getattr(os, "statvfs", None)  # None on Windows
    if not os.access(folder, os.W_OK | os.X_OK):
        if statvfs is not None and statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
        return (
            f"{folder} is not writable by this user (see its permissions, ls -ld, and whether "
            f"it is immutable, lsattr -d)"
        )
    if statvfs is None:
        return None
    disk = statvfs(folder)
    # root may also fill the blocks a file system keeps back for it.
    root = getattr(os, "geteuid", lambda: -1)() == 0
    free = (disk.f_bfree if root else disk.f_bavail) * disk.f_frsize
    if free < MIN_FREE_BYTES:
        return f"{folder} is on a full disk ({free:,} bytes free)"
    return None


def train_task(cfg: DictConfig) -> float:
    """Train a GPT; returns the best val loss, which Hydra sweepers minimise."""
    from gptlab.training.checkpoints import last_checkpoint
    from gptlab.training.distributed import sweep_job
    from gptlab.training.records import RUN_RECORD
    from gptlab.training.run import run

    run_dir = Path(cfg.paths.output_dir)
    record = file_version(run_dir / RUN_RECORD)
    try:
        # In a -m sweep with strategy=ddp, each job's child ranks run that job only.
        with sweep_job():
            return run(cfg)
    except KeyboardInterrupt:
        # Inside fit, Ctrl-C saves and stops at a step (GracefulInterrupt); this one came
        # before training (the run's record is as it was) or after it.
        if file_version(run_dir / RUN_RECORD) != record:
            message = f"Stopped by Ctrl-C after training; the run is in {run_dir}."
        elif last_checkpoint(run_dir).is_file():
            message = (
                f"{STOPPED_BEFORE_TRAINING}; {run_dir} keeps its checkpoints, and "
                f"resume={run_dir} continues it."
            )
        else:
            message = f"{STOPPED_BEFORE_TRAINING}; nothing to resume."
        print(message, file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def file_version(path: Path) -> tuple[int, int] | None:
    """Which version of a file this is (files are replaced whole): inode and change time."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def generate_task(cfg: DictConfig) -> None:
    """Sample text from a checkpoint or GPT-2 weights; tokens stream to stdout as they come."""
    import torch

    from gptlab.inference.generation import (
        check_sampling,
        encode_prompt,
        seeded_generator,
        stream_text,
        stream_tokens,
    )
    from gptlab.inference.loading import load_model
    from gptlab.training.settings import resolve_device

    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.num_samples)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.ckpt, cfg.pretrained, cfg.paths.log_dir)
    tokenizer = loaded.tokenizer
    prompt = torch.tensor([encode_prompt(tokenizer, cfg.prompt)], device=device)
    model = loaded.model.to(device)
    log.info("Sampling from %s on %s", loaded.source, device)
    generator = seeded_generator(cfg.seed, device)
    eos_id = tokenizer.eot_id if cfg.stop_at_eot else None
    for sample in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {sample + 1} of {cfg.num_samples} ---")
        print(cfg.prompt, end="", flush=True)
        tokens = stream_tokens(
            model,
            prompt,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_id=eos_id,
            generator=generator,
            use_cache=cfg.use_cache,
        )
        ids = (int(token[0]) for token in tokens)
        for text in stream_text(tokenizer, (i for i in ids if i != eos_id)):
            sys.stdout.write(text)
            sys.stdout.flush()
        print()


def evaluate_task(cfg: DictConfig) -> None:
    """Loss, perplexity and next-token accuracy of a model on a text file or a data split, or
    lm-evaluation-harness tasks (`tasks=`)."""
    if cfg.get("tasks") is not None:
        from gptlab.inference.harness import evaluate_tasks

        evaluate_tasks(cfg)
        return
    from gptlab.inference.evaluation import evaluate

    evaluate(cfg)


def prepare_task(cfg: DictConfig) -> None:
    """Tokenise a corpus once into tokens.bin and meta.json, for data=prepared."""
    from omegaconf import OmegaConf

    from gptlab.data.corpus import CorpusSpec
    from gptlab.data.prepared import prepare_corpus

    out_dir = Path(cfg.out_dir).expanduser()
    corpus = CorpusSpec.from_mapping(OmegaConf.to_container(cfg.data, resolve=True))
    metadata = prepare_corpus(corpus, cfg.tokenizer, out_dir, cfg.num_proc)
    print(
        f"Wrote {metadata['n_tokens']:,} tokens ({metadata['dtype']}) from "
        f"{metadata['n_documents']:,} documents to {out_dir}"
    )
    print(f"Train on them: python scripts/train.py data=prepared data.dir={out_dir}")


def export_task(cfg: DictConfig) -> None:
    """Write a checkpoint as a Hugging Face folder: GPT2LMHeadModel weights and config, the
    tokenizer and a model card, which transformers loads offline."""
    from gptlab.export.huggingface import export_checkpoint

    out = export_checkpoint(cfg.ckpt, cfg.out, cfg.paths.log_dir)
    print(f"Wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")


def bench_task(cfg: DictConfig) -> None:
    """Time gptlab's Lightning training step against a plain PyTorch loop."""
    from gptlab.training.benchmark import benchmark_from_config

    benchmark_from_config(cfg)


train = hydra_command(
    "train", train_task, owns_run_dir=True, stopped=f"{STOPPED_BEFORE_TRAINING}; nothing to resume."
)
generate = hydra_command("generate", generate_task)
evaluate = hydra_command("evaluate", evaluate_task)
prepare = hydra_command("prepare", prepare_task, owns_run_dir=True)
bench = hydra_command("bench", bench_task, owns_run_dir=True)
export = hydra_command("export", export_task)


@exit_on_reported_error
def summarize() -> None:
    """Rank the runs of a sweep: write summary.csv, .md and .png and print the table."""
    import argparse

    from gptlab.sweeps.summary import write_summary

    parser = argparse.ArgumentParser(prog="gptlab-summarize", description=summarize.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    args = parser.parse_args()
    csv_path, md_path, png_path = write_summary(args.sweep_dir)
    print(md_path.read_text())
    print(f"Wrote {csv_path}, {md_path} and {png_path}")
