"""Hyperparameter sweeps: each run's record, and the ranked summary of a multirun directory.

Every run writes `<run dir>/run_summary.json` (see `write_run_record`), whether it completes or
fails, so a sweep can be summarised from its directory alone: by the Hydra callback
`SweepSummary` after every job of a multirun, or on demand by `scripts/summarize_sweep.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import ConfigError

log = logging.getLogger(__name__)

RUN_RECORD = "run_summary.json"
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
    # (Ctrl-C, resumable); `unknown` is what a summary shows for a run without a record.
    status: str
    overrides: list[str]
    best_val_loss: float | None = None
    val_ppl: float | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_time_s: float | None = None
    error: str | None = None


def error_line(err: BaseException) -> str:
    """The exception's type and the first line of its message: enough to tell failures apart."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def write_run_record(run_dir: Path, record: RunRecord) -> Path:
    path = Path(run_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(dataclasses.asdict(record), indent=2) + "\n")
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


def atomic_write(path: Path, text: str) -> None:
    """Readers never see half a file, even when parallel jobs rewrite the same summary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a multirun (Hydra's numbered subdirs), in job order."""
    found = [
        d
        for d in Path(sweep_dir).iterdir()
        if d.is_dir() and ((d / ".hydra").is_dir() or (d / RUN_RECORD).is_file())
    ]
    return sorted(found, key=lambda d: (int(d.name) if d.name.isdigit() else math.inf, d.name))


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def varying_keys(records: Sequence[RunRecord]) -> list[str]:
    """Override keys whose value is not the same in every run: what the sweep changed."""
    given = [dict(split_override(o) for o in record.overrides) for record in records]
    keys = dict.fromkeys(key for overrides in given for key in overrides)
    return [key for key in keys if len({overrides.get(key) for overrides in given}) > 1]


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run, best val loss first; runs without a finite loss go last, in job order."""
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
        row["run"] = run_dir.name
        row["swept"] = {
            key: value for key, value in map(split_override, record.overrides) if key in swept
        }
        # A sweep of one run, or of repeats, changed nothing: then show every override.
        shown = [o for o in record.overrides if split_override(o)[0] in swept or not swept]
        row["shown_overrides"] = shown
        row["overrides"] = " ".join(shown)
        rows.append(row)

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        loss = row["best_val_loss"]
        finite = loss is not None and math.isfinite(loss)
        return (not finite, loss if finite else 0.0)

    return sorted(rows, key=rank)


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def short_override(override: str) -> str:
    """`optimizer.lr=0.00024380478036384822` as `optimizer.lr=0.0002438`, for reading."""
    key, value = split_override(override)
    number = as_number(value)
    return f"{key}={number:.4g}" if number is not None and "." in value else override


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("rank", *COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        shown = {**row, "overrides": " ".join(map(short_override, row["shown_overrides"]))}
        cells = [str(rank)] + [format_cell(shown[c]).replace("|", r"\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[dict[str, Any]], sweep_dir: Path, path: Path) -> None:
    completed = sum(row["status"] == "completed" for row in rows)
    text = (
        f"# Sweep {sweep_dir}\n\n"
        f"{len(rows)} runs: {completed} completed, sorted by best val loss (lowest first).\n\n"
        f"{markdown_table(rows)}\n"
    )
    atomic_write(path, text)


def single_numeric_parameter(rows: Sequence[dict[str, Any]]) -> str | None:
    """The swept key when exactly one is swept and all its values are numbers."""
    keys = {key for row in rows for key in row["swept"]}
    if len(keys) != 1:
        return None
    (key,) = keys
    if all(as_number(row["swept"].get(key)) is not None for row in rows):
        return key
    return None


def plot_summary(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Best val loss against the swept value when there is one numeric parameter, else per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["best_val_loss"] is not None and math.isfinite(r["best_val_loss"])]
    failed = len(rows) - len(done)
    key = single_numeric_parameter(rows)
    fig = Figure(figsize=(7, max(3.0, 0.35 * len(done) + 1.5)) if key is None else (6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if key is not None and done:
        points = sorted((as_number(r["swept"][key]), r["best_val_loss"]) for r in done)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o")
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best val loss")
    elif done:
        labels = [f"#{r['run']} {r['overrides']}"[:70] for r in done]
        ax.barh(range(len(done)), [r["best_val_loss"] for r in done])
        ax.set_yticks(range(len(done)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("best val loss (best first)")
    else:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    title = f"{len(done)} completed runs"
    ax.set_title(title + (f", {failed} failed or unfinished" if failed else ""))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def write_summary(sweep_dir: Path) -> list[Path]:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; return their paths."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir)
    csv_path, md_path, png_path = (sweep_dir / name for name in SUMMARY_FILES)
    write_csv(rows, csv_path)
    write_markdown(rows, sweep_dir, md_path)
    plot_summary(rows, png_path)
    return [csv_path, md_path, png_path]


class SweepSummary(Callback):
    """Hydra callback: rewrite the sweep summary after every job and at the end of a multirun.

    After every job too, because Hydra's basic sweeper re-raises a failed job's error once
    its batch is done, and then `on_multirun_end` never runs.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.summarize(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.summarize(Path(config.hydra.sweep.dir))

    @staticmethod
    def summarize(sweep_dir: Path) -> None:
        # A summary that cannot be written must not stop the sweep that it describes.
        try:
            paths = write_summary(sweep_dir)
        except Exception:
            log.exception("Could not write the sweep summary in %s", sweep_dir)
            return
        log.info("Sweep summary: %s (and .csv, .png)", paths[1])
