"""Each run's record, `<run dir>/run_summary.json`: written by the run whatever ends it,
read by sweep summaries, so a sweep can be summarised from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.atomic import atomic_write_text
from gptlab.errors import TrainingInterrupted

log = logging.getLogger(__name__)


RUN_RECORD = "run_summary.json"


@dataclasses.dataclass
class RunRecord:
    """What a sweep needs to know about one run; stored as `<run dir>/run_summary.json`."""

    # running (or killed before it could say otherwise), completed, failed, interrupted
    # (Ctrl-C, SIGTERM: resumable), pruned (stopped early by an Optuna pruner: its loss so
    # far); `unknown` is what a summary shows for a run without a record.
    status: str
    overrides: list[str]
    best_val_loss: float | None = None
    val_ppl: float | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_time_s: float | None = None
    error: str | None = None
    tokens_per_sec: float | None = None
    # The untrained model's val loss (step 0), next to ln(vocab_size).
    untrained_val_loss: float | None = None
    # Where and how it trained: `NVIDIA H100 80GB HBM3` or `cpu`, the Lightning precision, and
    # torch's float32 matmul precision (`high`: TF32 on GPUs that have it).
    device: str | None = None
    precision: str | None = None
    float32_matmul_precision: str | None = None


def error_line(err: BaseException) -> str:
    """The exception's type and the first line of its message: enough to tell failures apart."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def status_of(err: BaseException) -> str:
    """How a run that raised `err` ended: interrupted (resumable), pruned by Optuna, or failed.

    Optuna is imported only by Optuna sweeps, so without it no run can be pruned.
    """
    if isinstance(err, TrainingInterrupted):
        return "interrupted"
    optuna = sys.modules.get("optuna")
    if optuna is not None and isinstance(err, optuna.TrialPruned):
        return "pruned"
    return "failed"


def write_run_record(run_dir: Path, record: RunRecord) -> Path:
    path = Path(run_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return path


def read_run_record(run_dir: Path) -> RunRecord:
    """The run's record, or an `unknown` one for a run dir without (not from gptlab's run)."""
    path = run_dir / RUN_RECORD
    if path.is_file():
        # Keys this version does not know (from a newer gptlab) are left out, not an error.
        known = {field.name for field in dataclasses.fields(RunRecord)}
        data = json.loads(path.read_text())
        return RunRecord(**{key: value for key, value in data.items() if key in known})
    return RunRecord(
        status="unknown",
        overrides=hydra_overrides(run_dir),
        error=f"no {RUN_RECORD}: see the log files in {run_dir}",
    )


def hydra_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra saved for a run."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
