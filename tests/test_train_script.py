"""End to end: the real scripts/train.py on a tiny config, then the checkpoint it wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_RUN, run_script
from gptlab.module import GPTLightningModule


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout + result.stderr


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_run_writes_checkpoints_and_tensorboard(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "lr"):
        assert scalars(run_dir, tag), f"no {tag} scalars logged"


def test_val_loss_falls_from_the_untrained_value(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    val = scalars(run_dir, "val/loss")
    assert val[0][0] == 0, "the untrained model's val loss is logged at step 0"
    assert len(val) >= 3
    assert val[-1][1] < val[0][1] - 0.5


def test_run_reports_what_the_user_needs(tiny_run: tuple[Path, str]) -> None:
    run_dir, output = tiny_run
    assert "Best val loss:" in output
    assert "last.ckpt" in output
    assert f"tensorboard --logdir {run_dir}" in output
    assert "Every effort moves you" in output
    assert "ln(vocab_size)" in output
    assert re.search(r"Model: \d{1,3}(,\d{3})+ parameters", output)


def test_checkpoint_alone_rebuilds_model_and_tokenizer(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    first = GPTLightningModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    second = GPTLightningModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    ids = torch.tensor([first.tokenizer.encode("def f(x):\n    return x")])
    assert first.tokenizer.decode(ids[0].tolist()) == "def f(x):\n    return x"
    with torch.no_grad():
        torch.testing.assert_close(first(ids), second(ids), rtol=0, atol=0)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, state[name]), name
