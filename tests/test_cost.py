"""The CPU cost line: a run on a CPU says what it costs once its first steps are timed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from conftest import cpu_trainer
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.cost import CPU_SIZED_RUN, CpuCost, duration
from gptlab.training.module import GPTLightningModule


def tiny_module() -> GPTLightningModule:
    return GPTLightningModule(
        {"vocab_size": 16, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1},
        {"lr": 1e-3},
        CharTokenizer("abcdefghijklmnop").to_dict(),
    )


def test_a_cpu_run_reports_its_step_time_estimate_and_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = cpu_trainer(
        tmp_path,
        max_steps=10,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        callbacks=[CpuCost(timed_steps=3)],
    )
    with caplog.at_level(logging.INFO, logger="gptlab.training.cost"):
        trainer.fit(tiny_module(), train_dataloaders=random_batches(16, 8, batch_size=4, n=20))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gptlab.training.cost"]
    found = re.fullmatch(
        r"On the CPU a step takes (\d+\.\d\d) s: the 6 steps left take about (.+), and this "
        r"process has used up to (\d+\.\d) GB of memory\.",
        line,
    )
    assert found, line
    assert float(found[3]) > 0
    assert CPU_SIZED_RUN not in line, "a run of seconds is not told to shrink"


def test_a_run_of_hours_is_offered_the_cpu_sized_experiment() -> None:
    line = CpuCost().report(per_step=5.0, steps_left=1000)
    assert "about 1 h 23 min" in line and CPU_SIZED_RUN in line


@pytest.mark.parametrize(
    ("seconds", "text"), [(40, "40 s"), (720, "12 min"), (11_100, "3 h 05 min")]
)
def test_durations_read_at_the_precision_of_an_estimate(seconds: float, text: str) -> None:
    assert duration(seconds) == text
