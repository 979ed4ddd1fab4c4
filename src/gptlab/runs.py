"""A run directory: which one a run writes to, and that one process at a time owns it.

`conf/hydra/default.yaml` names run and sweep directories through the resolvers registered
by `register_resolvers`:

- a fresh run claims `<log dir>/<date>/<HH-MM-SS>` by creating it, or `<HH-MM-SS>-2`, `-3`,
  ... when another run started in the same second, so no two runs share a directory;
- `resume=<run dir>` or `ckpt_path=<run dir>/checkpoints/<file>` continues in that
  directory, so its TensorBoard curves carry on;
- a SLURM job writes to `<log dir>/slurm-<job id>`, which stays the same when the job is
  requeued, and a requeued job continues from its `last.ckpt`.

While a run trains it holds an exclusive lock on `<run dir>/.lock` (released by the OS even
when the process is killed), so a second process cannot resume a directory still in use. The
lock comes first: Hydra writes nothing into the directory (`hydra.output_subdir: null`, a log
file only from `owned`), and the config record and the log file are written once it is held,
so a refused process leaves every byte of the running one's directory as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.atomic import atomic_write_text, remove_stale_temporaries
from gptlab.errors import ConfigError
from gptlab.jobs import job_subdir
from gptlab.training.checkpoints import CHECKPOINT_DIR, last_checkpoint

LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"
# Run directories this process holds, and how many `owned` blocks hold each: the command
# holds its run's directory, and `gptlab.training.run.run` (also called on its own) holds it again.
HELD: dict[Path, int] = {}


def slurm_job_id() -> str | None:
    """The SLURM job (array jobs: `<job>_<task>`) this process runs in, if any."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_restarted() -> bool:
    """Whether this SLURM job was requeued (SLURM counts its restarts)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def continued_run_dir(resume: str | None, ckpt_path: str | None) -> Path | None:
    """The existing run directory a resume writes into, or None for a fresh run directory."""
    if resume:
        run_dir = Path(resume).expanduser()
        return run_dir if run_dir.is_dir() else None
    if ckpt_path:
        ckpt = Path(ckpt_path).expanduser()
        run_dir = ckpt.parent.parent
        if ckpt.parent.name == CHECKPOINT_DIR and (run_dir / HYDRA_DIR).is_dir():
            return run_dir
    return None


def claim_new_dir(parent: str | Path) -> str:
    """Create and return `<parent>/<date>/<HH-MM-SS>`, suffixed `-2`, `-3`... if taken."""
    now = datetime.datetime.now()
    base = Path(parent) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise ConfigError(f"Could not create a new run directory under {base.parent}.")


def hydra_run_dir(resume: str | None, ckpt_path: str | None, log_dir: str) -> str:
    continued = continued_run_dir(resume, ckpt_path)
    if continued is not None:
        return str(continued)
    job = slurm_job_id()
    if job is not None:
        return str(Path(log_dir) / f"slurm-{job}")
    return claim_new_dir(log_dir)


def hydra_config_subdir(resume: str | None, ckpt_path: str | None) -> str:
    """`.hydra` for a fresh run; `.hydra/resume-<time>` when continuing one, so its record stays."""
    continuing = continued_run_dir(resume, ckpt_path) is not None or (
        slurm_job_id() is not None and slurm_restarted()
    )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return f"{HYDRA_DIR}/resume-{stamp}" if continuing else HYDRA_DIR


def run_name(log_dir: str, run_dir: str) -> str:
    """A run's name in the loggers, as `tensorboard --logdir <log dir>` names it: its folder
    under the log dir (`2026-12-05/10-00-00`, `multirun/<date>/<time>/0-lr=0.001`), or the
    folder's own name where it lies elsewhere."""
    run, logs = Path(run_dir).resolve(), Path(log_dir).resolve()
    return run.relative_to(logs).as_posix() if logs in run.parents else run.name


def register_resolvers() -> None:
    """Make the resolvers `conf/hydra/default.yaml` and `conf/logger/` use known to OmegaConf.

    Cached, so each config resolves its directory once; Hydra copies the cache from a sweep's
    config to each job's, so all jobs see the same sweep directory.
    """
    OmegaConf.register_new_resolver("gptlab.run_dir", hydra_run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("gptlab.new_dir", claim_new_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("gptlab.job_subdir", job_subdir, replace=True)
    OmegaConf.register_new_resolver("gptlab.run_name", run_name, replace=True)


def requeued_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a requeued SLURM job continues from: its run directory's last.ckpt."""
    last = last_checkpoint(run_dir)
    if slurm_job_id() is not None and slurm_restarted() and last.is_file():
        return str(last)
    return None


@contextlib.contextmanager
def owned(run_dir: Path, config: DictConfig | None = None) -> Iterator[None]:
    """Hold the run directory for this process; refuse it if another process holds it.

    Nothing is written into it before it is held, so a refused process leaves it as it was.
    Then the temporary files a killed writer left are removed and, given the Hydra job's
    `config`, the job's record and log file are written (see `record_hydra_job`). Only rank 0
    of a multi-process run takes the lock and writes the record: the other ranks write into
    the same directory by design. A directory this process holds already is simply held on.
    """
    run_dir = Path(run_dir)
    key = run_dir.absolute()
    if key in HELD:
        HELD[key] += 1
        try:
            yield
        finally:
            HELD[key] -= 1
        return
    with contextlib.ExitStack() as stack:
        if rank_zero_only.rank == 0:
            stack.enter_context(locked(run_dir))
            try:
                for directory in (run_dir, run_dir / CHECKPOINT_DIR):
                    remove_stale_temporaries(directory)
                if config is not None:
                    record_hydra_job(run_dir, config)
            except OSError as err:
                raise unwritable(run_dir, err) from None
        if config is not None:
            stack.enter_context(job_log_file(run_dir))
        HELD[key] = 1
        try:
            yield
        finally:
            del HELD[key]


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on `<run dir>/.lock`, which names the process holding it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per directory is on the user
        yield
        return
    lock_path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Unbuffered, so a write that fails (a full disk) fails here, not again on close.
        lock = open(lock_path, "a+b", buffering=0)  # noqa: SIM115 - closed by the with below
    except OSError as err:
        raise unwritable(run_dir, err) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().decode(errors="replace").strip()
            holder = f"process {pid}" if pid else "another process"
            raise ConfigError(
                f"The run directory {run_dir} is in use by {holder}, which holds "
                f"{lock_path}: wait for that run to end or stop it; to train beside it, start "
                f"a new run (without resume=, ckpt_path= or hydra.run.dir={run_dir})."
            ) from None
        try:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n".encode())
        except OSError as err:
            raise unwritable(run_dir, err) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_hydra_job(run_dir: Path, config: DictConfig) -> None:
    """Write what Hydra writes before a job when `hydra.output_subdir` is set: the job's
    config.yaml, hydra.yaml and overrides.yaml, in `.hydra`, or in `.hydra/resume-<time>`
    when the job continues a run, so that the first run's record stays. Each file is written
    whole or not at all."""
    hydra = HydraConfig.get()
    subdir = run_dir / hydra_config_subdir(config.get("resume"), config.get("ckpt_path"))
    subdir.mkdir(parents=True, exist_ok=True)
    records = {
        "config.yaml": OmegaConf.to_yaml(config),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})),
        "overrides.yaml": OmegaConf.to_yaml(hydra.overrides.task),
    }
    for name, text in records.items():
        atomic_write_text(subdir / name, text)


@contextlib.contextmanager
def job_log_file(run_dir: Path) -> Iterator[None]:
    """Log to `<run dir>/<job name>.log` too, in the console's format, as Hydra's default job
    logging would (`conf/hydra/job_logging/console.yaml` leaves the file to this)."""
    root = logging.getLogger()
    try:
        handler = logging.FileHandler(run_dir / f"{HydraConfig.get().job.name}.log")
    except OSError as err:
        raise unwritable(run_dir, err) from None
    handler.setFormatter(next((h.formatter for h in root.handlers if h.formatter), None))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


# How to get past an OSError that stops a run from writing into its directory, by errno.
UNWRITABLE_FIXES = {
    errno.EROFS: "it is on a read-only file system: give a folder on a writable one (e.g. "
    "paths.log_dir=outputs), or, to continue a run kept there, copy it to a writable place "
    "and resume the copy",
    errno.ENOSPC: "the disk is full: free some space, or give a folder on another disk (e.g. "
    "paths.log_dir=<folder>)",
    errno.EDQUOT: "your disk quota is used up: free some space, or give a folder elsewhere",
}


def unwritable(path: Path, err: OSError) -> ConfigError:
    """A place a run cannot write to, as one paragraph: the path, the reason, the way out."""
    fix = UNWRITABLE_FIXES.get(
        err.errno or 0,
        "check its permissions (ls -ld) and attributes (lsattr -d), or give a folder you can "
        "write (e.g. paths.log_dir=outputs)",
    )
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return ConfigError(f"Cannot write into {path}{where}: {err.strerror}; {fix}.")
