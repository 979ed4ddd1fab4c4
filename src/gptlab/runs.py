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
when the process is killed), so a second process cannot resume a directory still in use.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from gptlab.atomic import remove_stale_temporaries
from gptlab.checkpoints import CHECKPOINT_DIR, last_checkpoint
from gptlab.errors import ConfigError
from gptlab.sweep import job_subdir

LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"


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


def register_resolvers() -> None:
    """Make the resolvers `conf/hydra/default.yaml` uses known to OmegaConf.

    Cached, so each config resolves its directory once; Hydra copies the cache from a sweep's
    config to each job's, so all jobs see the same sweep directory.
    """
    OmegaConf.register_new_resolver("gptlab.run_dir", hydra_run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("gptlab.new_dir", claim_new_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver(
        "gptlab.config_subdir", hydra_config_subdir, replace=True, use_cache=True
    )
    OmegaConf.register_new_resolver("gptlab.job_subdir", job_subdir, replace=True)


def requeued_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a requeued SLURM job continues from: its run directory's last.ckpt."""
    last = last_checkpoint(run_dir)
    if slurm_job_id() is not None and slurm_restarted() and last.is_file():
        return str(last)
    return None


@contextlib.contextmanager
def owned(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for this process; refuse it if another process holds it.

    Only rank 0 of a multi-process run takes the lock: the other ranks write into the same
    directory by design. Temporary files a killed writer left are removed once it is ours.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per directory is on the user
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip()
            holder = f"process {pid}" if pid else "another process"
            raise ConfigError(
                f"The run directory {run_dir} is in use by {holder}, which holds "
                f"{lock_path}: wait for that run to end or stop it; to train beside it, start "
                f"a new run (without resume= or ckpt_path=)."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        for directory in (run_dir, run_dir / CHECKPOINT_DIR):
            remove_stale_temporaries(directory)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
