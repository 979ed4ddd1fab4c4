"""gptlab's commands (`gptlab-train`, `gptlab-generate`, ...): each composes its config and
calls the package; a reported error becomes one paragraph and an exit code.

`scripts/*.py` call these too, so a checkout runs without installing the commands.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.console import quiet_lightning
from gptlab.errors import ConfigError, StorageError, TrainingInterrupted, exit_with_message
from gptlab.runs import register_resolvers
from gptlab.settings import resolve_device
from gptlab.sweep import in_multirun

T = TypeVar("T")

# conf/paths/default.yaml's log_dir, where runs go unless paths.log_dir says otherwise.
DEFAULT_LOG_DIR = "outputs"
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


def hydra_command(config_name: str, task: Callable[[DictConfig], T]) -> Callable[[], T | None]:
    """A console command: Hydra composes `conf/<config_name>.yaml` with the command line."""

    def command() -> T | None:
        expose_hydra_plugins()
        register_resolvers()
        quiet_lightning()
        exit_on_reported_error(check_log_dir)(sys.argv[1:])
        main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)
        return main(exit_on_reported_error(task))()

    command.__doc__ = task.__doc__
    return command


def check_log_dir(arguments: list[str]) -> None:
    """`paths.log_dir` must be a folder that can exist: checked before Hydra creates the run's
    folder under it, which would otherwise fail with a traceback."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in arguments if "=" in a and not a.startswith("-")]
        )
    except Exception:  # bad override syntax: Hydra itself reports it, with the grammar
        return
    given = [o.value() for o in overrides if o.key_or_group == "paths.log_dir"]
    log_dir = Path(str(given[-1]) if given else DEFAULT_LOG_DIR).expanduser()
    blocking = next((p for p in (log_dir, *log_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(
            f"paths.log_dir={str(log_dir)!r} cannot be a folder: {blocking} is a file. Give a "
            f"folder for the runs, e.g. paths.log_dir=outputs."
        )


def train_task(cfg: DictConfig) -> float:
    """Train a GPT; returns the best val loss, which Hydra sweepers minimise."""
    from gptlab.distributed import sweep_job
    from gptlab.train import run

    # In a -m sweep with strategy=ddp, each job's child ranks run that job only.
    with sweep_job():
        return run(cfg)


def generate_task(cfg: DictConfig) -> None:
    """Sample text from a checkpoint or GPT-2 weights; tokens stream to stdout as they come."""
    from gptlab.generation import (
        check_sampling,
        encode_prompt,
        seeded_generator,
        stream_text,
        stream_tokens,
    )
    from gptlab.loading import load_model

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
    """Loss, perplexity and next-token accuracy of a model on a text file or a data split."""
    from gptlab.evaluation import evaluate

    evaluate(cfg)


def prepare_task(cfg: DictConfig) -> None:
    """Tokenise a corpus once into tokens.bin and meta.json, for data=prepared."""
    from gptlab.corpus import CorpusSpec
    from gptlab.prepared import prepare_corpus

    out_dir = Path(cfg.out_dir).expanduser()
    corpus = CorpusSpec.from_mapping(OmegaConf.to_container(cfg.data, resolve=True))
    metadata = prepare_corpus(corpus, cfg.tokenizer, out_dir, cfg.num_proc)
    print(
        f"Wrote {metadata['n_tokens']:,} tokens ({metadata['dtype']}) from "
        f"{metadata['n_documents']:,} documents to {out_dir}"
    )
    print(f"Train on them: python scripts/train.py data=prepared data.dir={out_dir}")


def bench_task(cfg: DictConfig) -> None:
    """Time gptlab's Lightning training step against a plain PyTorch loop."""
    from gptlab.benchmark import benchmark_from_config

    benchmark_from_config(cfg)


train = hydra_command("train", train_task)
generate = hydra_command("generate", generate_task)
evaluate = hydra_command("evaluate", evaluate_task)
prepare = hydra_command("prepare", prepare_task)
bench = hydra_command("bench", bench_task)


@exit_on_reported_error
def summarize() -> None:
    """Rank the runs of a sweep: write summary.csv, .md and .png and print the table."""
    import argparse

    from gptlab.sweep import write_summary

    parser = argparse.ArgumentParser(prog="gptlab-summarize", description=summarize.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    args = parser.parse_args()
    csv_path, md_path, png_path = write_summary(args.sweep_dir)
    print(md_path.read_text())
    print(f"Wrote {csv_path}, {md_path} and {png_path}")


def model_preset(name: str) -> dict:
    """A `conf/model/<name>.yaml` preset as composed (its defaults applied), resolved."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    return OmegaConf.to_container(cfg.model, resolve=True)
