"""The sweeper's settings, under `hydra.sweeper` (see conf/hparams_search/optuna.yaml).

No `from __future__ import annotations`: Hydra imports plugins in a way that leaves
dataclasses unable to resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    """TPE; trial n samples with seed + n, so resumed or parallel sweeps draw anew."""

    seed: int | None = None
    n_startup_trials: int = 10


@dataclass
class GptlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.gptlab_optuna_sweeper.gptlab_optuna_sweeper.GptlabOptunaSweeper"
    direction: str = "minimize"
    study_name: str = "gptlab"
    # null: <sweep dir>/optuna.journal; sqlite:///<file> (or any database URL); a file ending in
    # .journal or .log, or journal:<path>, for a journal file that many workers can share.
    storage: str | None = None
    # Trials in the whole study, earlier runs and other workers included.
    n_trials: int = 20
    # Trials asked and handed to the launcher at a time.
    n_jobs: int = 1
    sampler: SamplerConf = field(default_factory=SamplerConf)
    # none, median or hyperband; pruner_args go to Optuna's MedianPruner or HyperbandPruner.
    pruner: str = "none"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    # A running trial whose sweep has been silent this long was killed: it is marked FAIL.
    stale_after_s: float = 120.0
    # Search space in Hydra's override syntax: interval(), tag(log, ...), choice(), range().
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="gptlab_optuna", node=GptlabOptunaSweeperConf, provider="gptlab"
)
