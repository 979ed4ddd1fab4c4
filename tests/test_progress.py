"""The run's progress bar: one bar of optimizer steps for the whole run, metrics in its postfix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from conftest import TINY_RUN, needs_shared_data, run_script
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.module import GPTLightningModule
from gptlab.training.progress import INTERRUPT_HINT, RunProgressBar, format_metric

VOCAB, CONTEXT, BATCH = 16, 8, 4
# A bar as tqdm draws it: "Epoch 2:  60%|██████    | 24/40 steps [...]".
BAR = re.compile(r"Epoch (\d+): +\d+%\|[^|]*\| (\d+)/(\d+) steps")


def tiny_module() -> GPTLightningModule:
    return GPTLightningModule(
        {
            "vocab_size": VOCAB,
            "context_length": CONTEXT,
            "emb_dim": 16,
            "n_heads": 2,
            "n_layers": 1,
        },
        {"lr": 1e-3},
        CharTokenizer("abcdefghijklmnop").to_dict(),
    )


def bar_trainer(tmp_path: Path, bar: RunProgressBar, *callbacks: Callback, **options) -> L.Trainer:
    """A CPU Trainer that draws only our bar (conftest's cpu_trainer has none)."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[bar, *callbacks],
        **options,
    )


class EpochEnds(Callback):
    """Remembers the training bar and its count at the end of every epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, int]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar, bar.n))


class ProgressBarMetrics(Callback):
    """Logs loss, lr and tokens/s for the progress bar only, as the training monitor does."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        for name, value in (("loss", outputs["loss"]), ("lr", lr), ("tok/s", 12345.6)):
            pl_module.log(name, value, prog_bar=True, logger=False)


def test_one_bar_counts_optimizer_steps_across_epochs(tmp_path: Path) -> None:
    epochs = EpochEnds()
    trainer = bar_trainer(
        tmp_path, RunProgressBar(refresh_rate=1), epochs, max_steps=12, accumulate_grad_batches=2
    )
    # 6 batches an epoch, 2 per optimizer step: 3 steps an epoch, 4 epochs.
    trainer.fit(tiny_module(), random_batches(VOCAB, CONTEXT, BATCH, n=6))
    bars = {id(bar) for bar, _ in epochs.seen}
    assert len(bars) == 1, "one bar for the run, not one per epoch"
    assert [n for _, n in epochs.seen] == [3, 6, 9, 12]
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.total, bar.n) == (12, 12)


def test_epochs_bound_the_total_when_there_is_no_max_steps(tmp_path: Path) -> None:
    trainer = bar_trainer(
        tmp_path,
        RunProgressBar(refresh_rate=1),
        max_steps=-1,
        max_epochs=2,
        accumulate_grad_batches=2,
    )
    # 5 batches an epoch: steps after batches 2, 4 and the epoch's last, 3 an epoch.
    trainer.fit(tiny_module(), random_batches(VOCAB, CONTEXT, BATCH, n=5))
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.total, bar.n) == (6, 6)


def test_postfix_shows_logged_metrics_read_only_when_the_bar_refreshes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    lightning_metrics = L.Trainer.progress_bar_metrics.fget

    def counted(trainer: L.Trainer) -> dict[str, float]:
        reads.append(trainer.global_step)
        return lightning_metrics(trainer)

    monkeypatch.setattr(L.Trainer, "progress_bar_metrics", property(counted))
    trainer = bar_trainer(
        tmp_path, RunProgressBar(refresh_rate=4), ProgressBarMetrics(), max_steps=12
    )
    trainer.fit(tiny_module(), random_batches(VOCAB, CONTEXT, BATCH, n=20))
    assert sorted(set(reads)) == [4, 8, 12], "metrics are read at refreshes, not every step"
    final = capsys.readouterr().out.split("\r")[-1]
    assert "12/12 steps" in final
    assert "lr=1.0e-03" in final
    assert "tok/s=12,346" in final
    assert re.search(r"loss=\d\.\d{3}\b", final), final


def test_resumed_run_starts_the_bar_at_the_resumed_step(tmp_path: Path) -> None:
    first = bar_trainer(tmp_path, RunProgressBar(), max_steps=4)
    loader = random_batches(VOCAB, CONTEXT, BATCH, n=20)
    first.fit(tiny_module(), loader)
    first.save_checkpoint(tmp_path / "step4.ckpt")
    second = bar_trainer(tmp_path, RunProgressBar(), max_steps=10)
    second.fit(tiny_module(), loader, ckpt_path=tmp_path / "step4.ckpt")
    bar = second.progress_bar_callback.train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (4, 10, 10)


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("loss", 4.23456, "4.235"),
        ("val/loss", 0.56123, "0.5612"),
        ("val/loss", 12.0, "12.00"),
        ("lr", 0.0003, "3.0e-04"),
        ("lr-AdamW", 1e-5, "1.0e-05"),
        ("tok/s", 91370.4, "91,370"),
        ("loss", float("nan"), "nan"),
        ("step", 1200, "1,200"),
    ],
)
def test_metrics_are_formatted_compactly(name: str, value: float, shown: str) -> None:
    assert format_metric(name, value) == shown


@needs_shared_data
def test_a_real_run_draws_one_bar_of_max_steps_after_the_ctrl_c_hint(tmp_path: Path) -> None:
    overrides = [o for o in TINY_RUN if "progress_bar" not in o and "max_steps" not in o]
    result = run_script(
        "train.py",
        *overrides,
        "data=verdict",
        "data.batch_size=32",
        "trainer.accumulate_grad_batches=2",  # 18 batches, 9 steps an epoch
        "trainer.max_steps=40",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    bars = [tuple(map(int, m.groups())) for m in BAR.finditer(out)]
    assert bars, out[-2000:]
    assert {total for _, _, total in bars} == {40}
    counts = [n for _, n, _ in bars]
    assert counts == sorted(counts), "the count never starts again"
    assert counts[-1] == 40
    assert {epoch for epoch, _, _ in bars} >= {0, 4}, "one bar through 5 epochs"
    (hint_line,) = [line for line in out.split("\n") if INTERRUPT_HINT in line]
    assert "steps" not in hint_line and "|" not in hint_line, "the hint has a line of its own"
    assert out.index(INTERRUPT_HINT) < out.index(" steps ")


def test_a_run_resumed_inside_an_epoch_draws_its_bar_from_the_resumed_step(tmp_path: Path) -> None:
    """Lightning starts no epoch when it resumes inside one, so the bar is drawn at the first
    batch; it used to be read before it existed, and every resume with the bar crashed."""
    overrides = [o for o in TINY_RUN if "progress_bar" not in o and "max_steps" not in o]
    first = run_script("train.py", *overrides, "trainer.max_steps=20", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("train.py", *overrides, "trainer.max_steps=30", f"resume={tmp_path}")
    assert second.returncode == 0, second.stderr[-3000:]
    counts = [int(m[2]) for m in BAR.finditer(second.stdout)]
    assert counts and min(counts) >= 20 and counts[-1] == 30, second.stdout[-2000:]
