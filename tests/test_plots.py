"""PNGs: loss.png's two axes agree, summary.png marks the best run legibly, saves are atomic."""

from __future__ import annotations

import errno
import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from matplotlib.axis import Axis
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.text import Text

from gptlab.sweeps.plots import (
    BEST_COLOUR,
    MAX_LABEL_CHARS,
    PRUNED_COLOUR,
    RUN_COLOUR,
    plot_summary,
    run_label,
    summary_figure,
)
from gptlab.training.plots import loss_figure, plot_losses, run_title, step_scale

Points = list[tuple[int, int, float]]


def history(tokens_per_step: Callable[[int], int], steps: range) -> Points:
    """(tokens seen, step, loss) after each of `steps`, given the tokens of each step."""
    return [(int(tokens_at(tokens_per_step, s)), s, 5.0 / math.sqrt(s)) for s in steps]


def resumed(step: int) -> int:
    """Tokens per step of a run resumed after step 100 with twice the batch."""
    return 256 if step <= 100 else 512


def tokens_at(tokens_per_step: Callable[[int], int], step: float) -> float:
    """Tokens seen after `step` steps, continued at the last rate past the whole steps."""
    whole = math.floor(step)
    before = sum(tokens_per_step(s) for s in range(1, whole + 1))
    return before + (step - whole) * tokens_per_step(whole + 1)


def drawn_tick_labels(axis: Axis) -> list[Text]:
    """Tick labels the last draw showed, major and minor: those with text, inside the view."""
    low, high = sorted(axis.get_view_interval())
    ticks = [
        *zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=True),
        *zip(axis.get_minorticklocs(), axis.get_minorticklabels(), strict=True),
    ]
    return [label for loc, label in ticks if label.get_text() and low <= loc <= high]


def tick_step(label: Text) -> float:
    return float(label.get_text().replace("\N{MINUS SIGN}", "-"))


def centre_x(label: Text) -> float:
    box = label.get_window_extent()
    return (box.x0 + box.x1) / 2


def assert_no_overlap(labels: list[Text]) -> None:
    assert len(labels) >= 2
    for a, b in itertools.combinations(labels, 2):
        assert not a.get_window_extent().overlaps(b.get_window_extent()), (
            f"{a.get_text()!r} overlaps {b.get_text()!r}"
        )


def inside_figure(fig: Figure, text: Text) -> bool:
    box, page = text.get_window_extent(), fig.bbox
    return page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1


def test_step_scale_is_exact_at_the_recorded_steps_and_linear_beyond() -> None:
    points = history(resumed, range(10, 201, 10))
    forward, inverse = step_scale(points)
    tokens = np.array([t for t, _, _ in points], dtype=float)
    steps = np.array([s for _, s, _ in points], dtype=float)
    np.testing.assert_allclose(forward(tokens), steps)
    np.testing.assert_allclose(inverse(steps), tokens)
    # The margins of the axis: before step 0 at the first rate, after the end at the last.
    np.testing.assert_allclose(forward(np.array([-2560.0])), [-10.0])
    np.testing.assert_allclose(inverse(np.array([-10.0, 210.0])), [-2560.0, tokens[-1] + 5120])
    grid = np.linspace(-0.1 * tokens[-1], 1.1 * tokens[-1], 1001)
    assert np.all(np.diff(forward(grid)) > 0)
    np.testing.assert_allclose(inverse(forward(grid)), grid, atol=1e-6 * tokens[-1])
    assert float(forward(np.float64(tokens[5]))) == steps[5], "scalars too"


def test_step_scale_leaves_out_pairs_that_do_not_advance_both() -> None:
    # A validation in the middle of an accumulated step: more tokens, the same step.
    forward, inverse = step_scale([(300, 1, 3.0), (400, 1, 2.9), (600, 2, 2.8)])
    np.testing.assert_allclose(forward(np.array([300.0, 600.0])), [1.0, 2.0])
    np.testing.assert_allclose(inverse(np.array([1.0, 2.0])), [300.0, 600.0])
    assert step_scale([(0, 0, 4.0)]) is None


@pytest.mark.parametrize(
    ("tokens_per_step", "train_steps", "val_steps"),
    [
        (lambda step: 4096, range(5, 151, 5), range(50, 151, 50)),
        (lambda step: 2048, range(10, 301, 10), range(100, 301, 100)),
        (resumed, range(10, 201, 10), range(50, 201, 50)),
    ],
    ids=["150-steps", "300-steps", "resumed-with-twice-the-batch"],
)
def test_top_axis_ticks_sit_above_the_tokens_of_their_step(
    tokens_per_step: Callable[[int], int], train_steps: range, val_steps: range
) -> None:
    train = history(tokens_per_step, train_steps)
    val = [(t, s, loss + 0.2) for t, s, loss in train if s in val_steps]
    fig = loss_figure(train, val)
    fig.canvas.draw()
    (ax,) = fig.axes
    (top,) = ax.child_axes
    labels = drawn_tick_labels(top.xaxis)
    assert len(labels) >= 3
    tokens_per_pixel = np.ptp(ax.get_xlim()) / ax.bbox.width
    for label in labels:
        tokens = ax.transData.inverted().transform((centre_x(label), 0))[0]
        expected = tokens_at(tokens_per_step, tick_step(label))
        assert tokens == pytest.approx(expected, abs=tokens_per_pixel), label.get_text()
    # Each validation sits under the top tick of its step, where there is one.
    (val_line,) = [line for line in ax.get_lines() if line.get_label() == "Validation loss"]
    assert val_line.get_marker() == "o", "markers show where the validations were"
    ticks = {tick_step(label): centre_x(label) for label in labels}
    shown = [(x, s) for (x, _), (_, s, _) in zip(val_line.get_xydata(), val, strict=True)]
    assert any(s in ticks for _, s in shown)
    for x, step in shown:
        if step in ticks:
            assert ax.transData.transform((x, 0))[0] == pytest.approx(ticks[step], abs=0.5)


def test_loss_plot_handles_a_resumed_history_and_no_validation(tmp_path: Path) -> None:
    # Tokens per step change from 256 to 512 halfway, as after resuming with a bigger batch.
    train = [(256 * s, s, 4.0 - 0.1 * s) for s in range(1, 5)]
    train += [(1024 + 512 * s, 4 + s, 3.6 - 0.1 * s) for s in range(1, 5)]
    plot_losses(train, [], tmp_path / "run" / "loss.png")
    assert imread(tmp_path / "run" / "loss.png").shape[0] > 100
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["loss.png"]


def row(run: int, swept: dict[str, str], loss: float | None, status: str) -> dict[str, Any]:
    """A row as `gptlab.sweeps.summary.summary_rows` gives it."""
    shown = [f"{key}={value}" for key, value in swept.items()]
    return {
        "run": str(run),
        "overrides": " ".join(shown),
        "shown_overrides": shown,
        "swept": swept,
        "best_val_loss": loss,
        "status": status,
    }


def sweep_rows(swept: Callable[[int], dict[str, str]]) -> list[dict[str, Any]]:
    """20 runs: 12 completed, 6 pruned, 2 failed, in a shuffled (not ranked) order."""
    rng = random.Random(0)
    losses = {"completed": (2.5, 3.5), "pruned": (3.2, 4.0)}
    statuses = ["completed"] * 12 + ["pruned"] * 6 + ["failed"] * 2
    rows = [
        row(run, swept(run), rng.uniform(*losses[status]) if status in losses else None, status)
        for run, status in enumerate(statuses)
    ]
    rng.shuffle(rows)
    return rows


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(
        (r for r in rows if r["best_val_loss"] is not None), key=lambda r: r["best_val_loss"]
    )


def long_overrides(run: int) -> dict[str, str]:
    return {
        "model.drop_rate": f"{0.01 * run + 0.0012345:.10f}",
        "optimizer.lr": str(1e-4 * 1.234567891**run),
        "optimizer.weight_decay": f"{0.001 * run:.12f}",
        "data.batch_size": str(8 * (run + 1)),
    }


def test_run_labels_drop_key_groups_only_where_the_rest_tells_keys_apart() -> None:
    swept = {"optimizer.lr": "0.00024380478036384822", "model.drop_rate": "0.1"}
    assert run_label(row(3, swept, 3.0, "completed")) == "#3 lr=0.0002438 drop_rate=0.1"
    clash = {"model.drop_rate": "0.1", "attn.drop_rate": "0.2"}
    assert run_label(row(4, clash, 3.0, "pruned")) == "#4 model.drop_rate=0.1 attn.drop_rate=0.2"
    label = run_label(row(5, long_overrides(5), 3.0, "completed"))
    assert len(label) == MAX_LABEL_CHARS and label.endswith("…")
    assert label.startswith("#5 drop_rate=0.05123 lr=0.0002868 weight_decay=")


def test_bars_mark_the_best_run_mute_pruned_ones_and_keep_labels_apart(tmp_path: Path) -> None:
    rows = sweep_rows(long_overrides)
    fig = summary_figure(rows)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_title() == "20 runs: 12 completed, 6 pruned, 2 failed"
    bars = ax.patches
    assert len(bars) == 18, "failed runs have no bar"
    best = best_of(rows)
    (best_bar,) = [bar for bar in bars if same_color(bar.get_facecolor(), BEST_COLOUR)]
    assert best_bar.get_width() == best["best_val_loss"]
    for colour, status in ((PRUNED_COLOUR, "pruned"), (RUN_COLOUR, "completed")):
        widths = {bar.get_width() for bar in bars if same_color(bar.get_facecolor(), colour)}
        expected = {r["best_val_loss"] for r in rows if r["status"] == status and r is not best}
        assert widths == expected
    values = [t for t in ax.texts if t.get_text().startswith("best ")]
    assert [t.get_text() for t in values] == [f"best {best['best_val_loss']:.4f}"]
    labels = drawn_tick_labels(ax.yaxis)
    assert len(labels) == 18
    assert labels[0].get_text() == run_label(best)
    assert all(len(label.get_text()) <= MAX_LABEL_CHARS for label in labels)
    assert_no_overlap(labels)
    for text in [*labels, *ax.texts]:
        assert inside_figure(fig, text), text.get_text()
    plot_summary(rows, tmp_path / "summary.png")
    assert imread(tmp_path / "summary.png").shape[0] > 100


@pytest.mark.parametrize(
    "learning_rate",
    [
        lambda run: 1e-5 * 1.5**run,
        lambda run: 2e-4 * 1.15**run,
        lambda run: 1.2345678e-4 + 4.5678e-5 * run,
    ],
    ids=["over-decades", "over-a-decade", "within-a-decade"],
)
def test_line_plot_marks_the_best_run_and_pruned_ones_with_legible_ticks(
    learning_rate: Callable[[int], float], tmp_path: Path
) -> None:
    rows = sweep_rows(lambda run: {"optimizer.lr": str(learning_rate(run))})
    fig = summary_figure(rows)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_title() == "20 runs: 12 completed, 6 pruned, 2 failed"
    lines = {line.get_label(): line for line in ax.get_lines()}
    best = best_of(rows)
    best_point = (float(best["swept"]["optimizer.lr"]), best["best_val_loss"])
    assert lines["best"].get_xydata().tolist() == [list(best_point)]
    pruned = lines["pruned (stopped early)"]
    assert pruned.get_marker() != lines["runs"].get_marker()
    assert sorted(map(tuple, pruned.get_xydata().tolist())) == sorted(
        (float(r["swept"]["optimizer.lr"]), r["best_val_loss"])
        for r in rows
        if r["status"] == "pruned"
    )
    assert len(lines["runs"].get_xydata()) == 12
    (note,) = [t for t in ax.texts if t.get_text().startswith("best ")]
    assert f"{best['best_val_loss']:.4f}" in note.get_text()
    box = note.get_window_extent()
    assert ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0
    assert not box.overlaps(ax.get_legend().get_window_extent())
    for line in ax.get_lines():
        for x, y in line.get_transform().transform(line.get_xydata()):
            assert not box.contains(x, y), "the note hides no run"
    ticks = drawn_tick_labels(ax.xaxis)
    assert_no_overlap(ticks)
    for text in ticks:
        assert inside_figure(fig, text), text.get_text()
    plot_summary(rows, tmp_path / "summary.png")
    assert imread(tmp_path / "summary.png").shape[0] > 100


def test_summary_without_any_loss_says_so(tmp_path: Path) -> None:
    rows = [row(0, {}, None, "failed"), row(1, {}, math.nan, "interrupted")]
    fig = summary_figure(rows)
    (ax,) = fig.axes
    assert ax.get_title() == "2 runs: 1 failed, 1 interrupted"
    assert [t.get_text() for t in ax.texts] == ["no run has a val loss"]


def disk_full(self: Figure, file: BinaryIO, **kwargs: Any) -> None:
    """Figure.savefig on a full disk: part of the file, then the error."""
    file.write(b"\x89PNG")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    "plot",
    [
        lambda path: plot_losses(history(resumed, range(10, 201, 10)), [], path),
        lambda path: plot_summary(sweep_rows(long_overrides), path),
    ],
    ids=["loss.png", "summary.png"],
)
def test_a_failing_save_keeps_the_previous_png_and_no_temp_file(
    plot: Callable[[Path], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "plot.png"
    plot(path)
    before = path.read_bytes()
    assert imread(path).shape[0] > 100
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        plot(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_loss_plot_is_titled_with_its_run(tmp_path: Path) -> None:
    train = [(256 * s, s, 4.0 - 0.1 * s) for s in range(1, 5)]
    (ax,) = loss_figure(train, [], title="2026-12-05/21-25-15").axes
    assert ax.get_title(loc="left") == "2026-12-05/21-25-15"
    job = tmp_path / "multirun" / "10-00-00" / "0-lr=0.001"
    assert run_title(job / "loss.png") == "10-00-00/0-lr=0.001"


def test_a_learning_rate_sweep_is_plotted_on_a_log_axis() -> None:
    rows = [
        row(0, {"optimizer.lr": "0.001"}, 2.26, "completed"),
        row(1, {"optimizer.lr": "0.0003"}, 2.43, "completed"),
    ]
    (ax,) = summary_figure(rows).axes
    assert ax.get_xscale() == "log"
    rows = [
        row(0, {"data.batch_size": "16"}, 2.26, "completed"),
        row(1, {"data.batch_size": "32"}, 2.43, "completed"),
    ]
    (ax,) = summary_figure(rows).axes
    assert ax.get_xscale() == "linear"


def test_bars_start_near_the_lowest_loss_so_close_runs_differ_visibly() -> None:
    rows = [
        row(0, {"optimizer.lr": "0.001", "model.drop_rate": "0.1"}, 2.26, "completed"),
        row(1, {"optimizer.lr": "0.0003", "model.drop_rate": "0.0"}, 2.43, "completed"),
    ]
    fig = summary_figure(rows)
    fig.canvas.draw()
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    assert 0 < low < 2.26 and high > 2.43
    boxes = [bar.get_window_extent() for bar in ax.patches]
    visible = [min(b.x1, ax.bbox.x1) - max(b.x0, ax.bbox.x0) for b in boxes]
    assert max(visible) > 1.5 * min(visible), "the longer loss shows a visibly longer bar"
