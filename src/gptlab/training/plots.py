"""`loss.png`: a run's train and val loss against tokens seen, optimizer steps on top.

Drawn with matplotlib's object API on the Agg canvas, so no GUI backend or global
pyplot state is involved. matplotlib is imported inside the functions: only these
writes need it, not every import of gptlab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptlab.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Path) -> None:
    """Save atomically: a full disk never leaves a broken PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip("."), dpi=100))


def linear_through(xs: np.ndarray, ys: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The piecewise linear function through (xs, ys), continued along its end segments.

    Continued rather than clamped, so that it stays invertible over an axis's margins.
    """
    first = (ys[1] - ys[0]) / (xs[1] - xs[0])
    last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])

    def f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xs, ys)
        y = np.where(x < xs[0], ys[0] + (x - xs[0]) * first, y)
        return np.where(x > xs[-1], ys[-1] + (x - xs[-1]) * last, y)

    return f


def step_scale(
    points: Sequence[tuple[int, int, float]],
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]] | None:
    """Tokens seen to optimizer steps and back, through the recorded pairs and (0, 0).

    Piecewise, because tokens per step change when a run resumes with another batch size.
    Pairs that do not increase in both (a validation in the middle of an accumulated step)
    are left out, so both directions stay monotonic. None when there is no step to show.
    """
    kept = [(0, 0)]
    for tokens, step in sorted({(t, s) for t, s, _ in points}):
        if tokens > kept[-1][0] and step > kept[-1][1]:
            kept.append((tokens, step))
    if len(kept) < 2:
        return None
    tokens, steps = (np.array(x, dtype=float) for x in zip(*kept, strict=True))
    return linear_through(tokens, steps), linear_through(steps, tokens)


def loss_figure(
    train_losses: Sequence[tuple[int, int, float]],
    val_losses: Sequence[tuple[int, int, float]],
    title: str = "",
) -> Figure:
    """Train and val loss against tokens seen, steps on the top axis: the book's plot, titled
    with the run it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for points, label, style in (
        (train_losses, "Training loss", {"linestyle": "-"}),
        # Markers show where the validations were, which a line through few points hides.
        (val_losses, "Validation loss", {"linestyle": "-.", "marker": "o"}),
    ):
        if points:
            tokens, _, losses = zip(*points, strict=True)
            ax.plot(tokens, losses, label=label, **style)
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.set_title(title, fontsize="medium", loc="left")
    ax.legend(loc="upper right")
    scale = step_scale([*train_losses, *val_losses])
    if scale is not None:
        ax.secondary_xaxis("top", functions=scale).set_xlabel("Steps")
    fig.tight_layout()
    return fig


def plot_losses(
    train_losses: Sequence[tuple[int, int, float]],
    val_losses: Sequence[tuple[int, int, float]],
    path: Path,
) -> None:
    """Write `loss_figure` to `path` ((tokens seen, optimizer step, loss) triples), titled with
    the run folder that holds it."""
    save_figure(loss_figure(train_losses, val_losses, run_title(path)), path)


def run_title(path: Path) -> str:
    """`2026-12-05/21-25-15` for a run's plot, `<sweep time>/0-lr=0.001` for a sweep job's."""
    folder = Path(path).resolve().parent
    return f"{folder.parent.name}/{folder.name}"
