"""Multi-process training under Hydra: keep DDP's re-launched children inside one sweep job.

Lightning's `strategy=ddp` starts ranks 1..N-1 by re-running `sys.argv` with
`hydra.run.dir=<HydraConfig run.dir>` appended. In a `-m` sweep `sys.argv` still holds
`--multirun` and the whole sweep's overrides, and `run.dir` is not the job's folder, so
every child would start a sweep of its own. Rewriting both for the running job makes each
child a plain single run of exactly this job, writing into this job's folder.
"""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


def forward_ddp_children_to_this_job() -> None:
    """In a multirun job, make `sys.argv` and `run.dir` describe this job alone."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
