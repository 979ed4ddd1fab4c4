"""Multi-process training under Hydra: keep DDP's re-launched children inside one sweep job.

Lightning's `strategy=ddp` starts ranks 1..N-1 by re-running `sys.argv` with
`hydra.run.dir=<HydraConfig run.dir>` appended. In a `-m` sweep `sys.argv` still holds
`--multirun` and the whole sweep's overrides, and `run.dir` is not the job's folder, so
every child would start a sweep of its own. Rewriting both for the running job makes each
child a plain single run of exactly this job, writing into this job's folder.

The sweep's next job then runs in the same parent process, which still holds the finished
job's process group and the launcher's environment (LOCAL_RANK, MASTER_PORT, ...); with
them Lightning would take the new job for an already-launched child and wait for peers
that have exited. Both are cleared when a job ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from gptlab.jobs import in_multirun


def forward_ddp_children_to_this_job() -> None:
    """Make `sys.argv` and `hydra.run.dir` describe the running sweep job alone."""
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


@contextmanager
def sweep_job() -> Iterator[None]:
    """Run one job of a `-m` sweep so that DDP children and later jobs stay apart."""
    if not in_multirun():
        yield
        return
    argv, environ = list(sys.argv), dict(os.environ)
    forward_ddp_children_to_this_job()
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
