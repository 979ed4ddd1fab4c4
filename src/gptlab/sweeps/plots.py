"""`summary.png`: a sweep's best val losses against the swept value, or a bar per run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.overrides import as_number, short_keys, short_override, split_override
from gptlab.training.plots import save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# How a sweep's runs end; statuses not listed here are counted after these, by name.
STATUS_ORDER = ("completed", "pruned", "failed", "interrupted", "running", "unknown")


BEST_COLOUR = "tab:green"


RUN_COLOUR = "tab:blue"


PRUNED_COLOUR = "0.7"


# Swept values spread by this factor or more are plotted on a log axis.
LOG_AXIS_RATIO = 3


# Longer run labels are cut, so that the bars keep most of the width; summary.md has them whole.
MAX_LABEL_CHARS = 60


def status_counts(rows: Sequence[dict[str, Any]]) -> str:
    """`12 completed, 6 pruned, 2 failed`: how the sweep's runs ended."""
    counts = Counter(row["status"] for row in rows)
    order = [*STATUS_ORDER, *sorted(set(counts) - set(STATUS_ORDER))]
    return ", ".join(f"{counts[status]} {status}" for status in order if counts[status])


def run_label(row: dict[str, Any]) -> str:
    """`#3 drop_rate=0.1 lr=0.0002438`: the run and what was swept, cut to a readable length.

    Keys lose their group (`optimizer.`) where the rest still tells them apart.
    """
    pairs = [split_override(o) for o in row["shown_overrides"]]
    names = short_keys([key for key, _ in pairs])
    overrides = [short_override(f"{names[key]}={value}") for key, value in pairs]
    label = " ".join([f"#{row['run']}", *overrides])
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def draw_against_value(ax: Axes, done: Sequence[dict[str, Any]], key: str) -> None:
    """Best val loss against the swept value; `done` is sorted best first."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    # Pruned runs get no line: their loss is from when they were stopped, not comparable.
    styles = {
        False: {"color": RUN_COLOUR, "marker": "o", "label": "runs"},
        True: {
            "color": PRUNED_COLOUR,
            "marker": "X",
            "ls": "none",
            "label": "pruned (stopped early)",
        },
    }
    for pruned, style in styles.items():
        points = sorted(
            (as_number(r["swept"][key]), r["best_val_loss"])
            for r in done
            if (r["status"] == "pruned") == pruned
        )
        if points:
            ax.plot(*zip(*points, strict=True), **style)
    xs = [as_number(r["swept"][key]) for r in done]
    best_x, best_loss = xs[0], done[0]["best_val_loss"]
    ax.plot([best_x], [best_loss], "*", markersize=16, color=BEST_COLOUR, label="best", zorder=3)
    # Under the best point, where no other run is: the text never hides data. Near an end of
    # the axis, it runs inwards.
    rank = sorted(xs).index(best_x) / max(len(xs) - 1, 1)
    ax.margins(y=0.2)
    ax.annotate(
        f"best {best_loss:.4f} at {best_x:.4g}",
        (best_x, best_loss),
        xytext=(0, -12),
        textcoords="offset points",
        ha="left" if rank < 0.25 else "right" if rank > 0.75 else "center",
        va="top",
        color=BEST_COLOUR,
        fontweight="bold",
    )
    # Few ticks, so that long numbers such as learning rates never overlap.
    if log_scaled(xs):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(numticks=7))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel("best val loss")


def log_scaled(values: Sequence[float]) -> bool:
    """Whether values are read by their ratios, as learning rates are: positive and spread by a
    factor of LOG_AXIS_RATIO or more (a 1e-3 vs 3e-4 sweep), so a log axis spaces them evenly."""
    return min(values) > 0 and max(values) >= LOG_AXIS_RATIO * min(values)


def draw_bars(ax: Axes, done: Sequence[dict[str, Any]]) -> None:
    """One bar per run, best first and coloured, each with its value."""
    losses = [r["best_val_loss"] for r in done]
    pruned = [r["status"] == "pruned" for r in done]
    colours = [BEST_COLOUR] + [PRUNED_COLOUR if p else RUN_COLOUR for p in pruned[1:]]
    bars = ax.barh(range(len(done)), losses, color=colours)
    ax.set_yticks(range(len(done)), [run_label(r) for r in done], fontsize=8)
    ax.invert_yaxis()
    values = [
        f"{loss:.4f}" + (" pruned" if p else "") for loss, p in zip(losses, pruned, strict=True)
    ]
    values[0] = "best " + values[0]
    labels = ax.bar_label(bars, values, padding=3, fontsize=7)
    labels[0].set(color=BEST_COLOUR, fontweight="bold")
    # The axis starts near the lowest loss, not at 0, where 2.26 and 2.43 would look alike.
    low, high = min(losses), max(losses)
    span = high - low or 0.05 * high
    ax.set_xlim(max(0.0, low - 0.5 * span), high + 0.6 * span)  # room for the values
    ax.set_xlabel("best val loss (best first)")


def single_numeric_parameter(rows: Sequence[dict[str, Any]]) -> str | None:
    """The swept key when exactly one is swept and all its values are numbers."""
    keys = {key for row in rows for key in row["swept"]}
    if len(keys) != 1:
        return None
    (key,) = keys
    if all(as_number(row["swept"].get(key)) is not None for row in rows):
        return key
    return None


def summary_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Best val loss against the swept value when there is one numeric parameter, else per run.

    The best run (lowest finite loss) is marked; pruned runs (stopped early by Optuna) are
    muted. The figure grows with the number of runs, so that their labels stay legible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = sorted(
        (r for r in rows if r["best_val_loss"] is not None and math.isfinite(r["best_val_loss"])),
        key=lambda r: r["best_val_loss"],
    )
    key = single_numeric_parameter(rows)
    size = (6.5, 4.0) if key is not None else (8.0, max(3.0, 0.3 * len(done) + 1.5))
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if key is not None and done:
        draw_against_value(ax, done, key)
    elif done:
        draw_bars(ax, done)
    else:
        ax.text(0.5, 0.5, "no run has a val loss", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{len(rows)} runs: {status_counts(rows)}")
    return fig


def plot_summary(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write `summary_figure` of `gptlab.sweeps.summary.summary_rows` to `path`."""
    save_figure(summary_figure(rows), path)
