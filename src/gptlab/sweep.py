"""Hyperparameter sweeps: each run's record, and the ranked summary of a multirun directory.

Every run writes `<run dir>/run_summary.json` (see `write_run_record`), whether it completes or
fails, so a sweep can be summarised from its directory alone: by the Hydra callback
`SweepSummary` after every job of a multirun, or on demand by `scripts/summarize_sweep.py`.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import io
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptlab.atomic import atomic_write_text
from gptlab.errors import ConfigError, TrainingInterrupted
from gptlab.overrides import as_number, run_name, short_override, split_override
from gptlab.plots import plot_summary, status_counts

log = logging.getLogger(__name__)

RUN_RECORD = "run_summary.json"
# The keys a sweep varies, written when it starts, read to name its jobs.
SWEEP_FILE = "sweep.json"
MAX_JOB_NAME = 120
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
COLUMNS = (
    "run",
    "overrides",
    "best_val_loss",
    "val_ppl",
    "steps",
    "tokens_seen",
    "wall_time_s",
    "status",
    "error",
)


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


def in_multirun() -> bool:
    """Whether this is one job of a Hydra sweep (`-m`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_number(run_dir: Path) -> str:
    """A job directory's number: `3` of `3-lr=0.001,drop_rate=0.1` (its whole name otherwise)."""
    return run_dir.name.split("-", 1)[0]


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a multirun (Hydra's numbered subdirs), in job order."""
    found = [
        d
        for d in Path(sweep_dir).iterdir()
        if d.is_dir() and ((d / ".hydra").is_dir() or (d / RUN_RECORD).is_file())
    ]

    def order(d: Path) -> tuple[float, str]:
        number = job_number(d)
        return (int(number) if number.isdigit() else math.inf, d.name)

    return sorted(found, key=order)


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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
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


def varying_keys(records: Sequence[RunRecord]) -> list[str]:
    """Override keys whose value is not the same in every run: what the sweep changed."""
    given = [dict(split_override(o) for o in record.overrides) for record in records]
    keys = dict.fromkeys(key for overrides in given for key in overrides)
    return [key for key in keys if len({overrides.get(key) for overrides in given}) > 1]


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run, best val loss first: completed runs, then pruned ones, then the rest
    (no finite loss), in job order."""
    dirs = run_dirs(sweep_dir) if Path(sweep_dir).is_dir() else []
    if not dirs:
        raise ConfigError(
            f"{sweep_dir} holds no runs: give a multirun directory such as "
            f"outputs/multirun/<date>/<time>, whose numbered subdirectories are the runs."
        )
    records = [read_run_record(d) for d in dirs]
    swept = varying_keys(records)
    rows = []
    for run_dir, record in zip(dirs, records, strict=True):
        row = dataclasses.asdict(record)
        row["run"] = job_number(run_dir)
        row["swept"] = {
            key: value for key, value in map(split_override, record.overrides) if key in swept
        }
        # A sweep of one run, or of repeats, changed nothing: then show every override.
        shown = [o for o in record.overrides if split_override(o)[0] in swept or not swept]
        row["shown_overrides"] = shown
        row["all_overrides"] = record.overrides
        row["overrides"] = " ".join(shown)
        rows.append(row)

    def rank(row: dict[str, Any]) -> tuple[int, float]:
        # A pruned run's loss is from fewer steps: it ranks after every completed run.
        loss = row["best_val_loss"]
        if loss is None or not math.isfinite(loss):
            return (2, 0.0)
        return (int(row["status"] == "pruned"), loss)

    return sorted(rows, key=rank)


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("rank", *COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        shown = {**row, "overrides": " ".join(map(short_override, row["shown_overrides"]))}
        cells = [str(rank)] + [format_cell(shown[c]).replace("|", r"\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[dict[str, Any]], sweep_dir: Path, path: Path) -> None:
    text = (
        f"# Sweep {sweep_dir}\n\n"
        f"{len(rows)} runs: {status_counts(rows)}; sorted by best val loss (lowest first), "
        f"completed runs before pruned ones.\n\n"
        f"{markdown_table(rows)}\n"
    )
    atomic_write_text(path, text)


def console_table(rows: Sequence[dict[str, Any]], limit: int = 10) -> str:
    """The top rows as aligned text, numbers right-aligned: what a terminal shows of the ranking."""
    header = ["rank", "run", "best val loss", "val ppl", "steps", "wall s", "status", "overrides"]
    show_errors = any(row["error"] for row in rows[:limit])
    if show_errors:
        header.append("error")
    lines = [header]
    for rank, row in enumerate(rows[:limit], start=1):
        loss, ppl, wall = row["best_val_loss"], row["val_ppl"], row["wall_time_s"]
        cells = [
            str(rank),
            row["run"],
            format_cell(loss),
            "" if ppl is None else f"{ppl:.2f}",
            format_cell(row["steps"]),
            "" if wall is None else f"{wall:.1f}",
            row["status"],
            " ".join(map(short_override, row["shown_overrides"])),
        ]
        lines.append([*cells, row["error"] or ""] if show_errors else cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numbers = range(header.index("status"))
    text = [
        "  ".join(
            cell.rjust(width) if i in numbers else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    if len(rows) > limit:
        text.append(f"... and {len(rows) - limit} more")
    return "\n".join(text)


def winner(rows: Sequence[dict[str, Any]]) -> str:
    """The best run and all its overrides, to repeat or build on it."""
    best = rows[0] if rows else None
    if best is None or best["best_val_loss"] is None or not math.isfinite(best["best_val_loss"]):
        return "No run finished with a val loss."
    overrides = " ".join(map(shlex.quote, best["all_overrides"])) or "(no overrides)"
    return f"Best: run {best['run']}, val loss {format_cell(best['best_val_loss'])}: {overrides}"


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; return their paths.

    `rows`: the sweep's ranked rows, where the caller has read them already.
    """
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir) if rows is None else rows
    csv_path, md_path, png_path = (sweep_dir / name for name in SUMMARY_FILES)
    write_csv(rows, csv_path)
    write_markdown(rows, sweep_dir, md_path)
    plot_summary(rows, png_path)
    return [csv_path, md_path, png_path]


class SweepSummary(Callback):
    """Hydra callback: rewrite the sweep summary after every job; print the ranking at the end.

    Rewritten after every job, so a sweep that is killed still leaves a current summary.
    Printed once: by `on_multirun_end`, or, where Hydra's basic sweeper re-raises a failed
    job's error and so never calls it, when the process exits, after Hydra's error.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        write_swept_keys(Path(config.hydra.sweep.dir), sweep_definition_keys(config))
        atexit.register(self.report, Path(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.summarize(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.report)
        self.report(Path(config.hydra.sweep.dir))

    @classmethod
    def report(cls, sweep_dir: Path) -> None:
        """Write the summary files and print the top of the ranking and the winner."""
        rows = cls.summarize(sweep_dir)
        if not rows:
            return
        print(
            f"Sweep of {len(rows)} runs, {status_counts(rows)}, best val loss first "
            f"(all in {sweep_dir / SUMMARY_FILES[1]}):\n{console_table(rows)}\n{winner(rows)}"
        )

    @staticmethod
    def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
        """The ranked rows, after writing them to the summary files; none if that failed.

        A sweep that stopped before its first job (a bad setting, a damaged study) has
        nothing to rank, and its own error says why: nothing is added to it.
        """
        if not (Path(sweep_dir).is_dir() and run_dirs(sweep_dir)):
            return []
        # A summary that cannot be written must not stop the sweep that it describes.
        try:
            rows = summary_rows(sweep_dir)
            write_summary(sweep_dir, rows)
            return rows
        except OSError as err:
            log.warning("Could not write the sweep summary in %s: %s", sweep_dir, err)
        except Exception:
            log.exception("Could not write the sweep summary in %s", sweep_dir)
        return []
