"""The ranked summary of a multirun directory: `summary.csv`, `summary.md`, `summary.png`
and the console table, written by the Hydra callback `SweepSummary` after every job,
or on demand by `scripts/summarize_sweep.py`.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import io
import logging
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from gptlab.atomic import atomic_write_text
from gptlab.errors import ConfigError
from gptlab.jobs import sweep_definition_keys, write_swept_keys
from gptlab.overrides import short_override, split_override
from gptlab.sweeps.plots import plot_summary, status_counts
from gptlab.training.records import RUN_RECORD, RunRecord, read_run_record

log = logging.getLogger(__name__)


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
