"""End to end: the real scripts/train.py on a tiny config, then the checkpoint it wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_RUN, run_script
from gptlab.training.module import GPTLightningModule


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout + result.stderr


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_run_writes_checkpoints_and_tensorboard(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert list((run_dir).glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "train/lr"):
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


def val_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in scalars(run_dir, "val/loss")]


def test_validation_interval_counts_optimizer_steps_under_accumulation(tmp_path: Path) -> None:
    # 512 tokens a step = 2 micro-batches of 8 windows x 32 tokens.
    result = run_script(
        "train.py",
        *TINY_RUN,
        "tokens_per_step=512",
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning counts val_check_interval in micro-batches: untranslated, it would validate at
    # every optimizer step.
    assert val_steps(tmp_path) == [0, 2, 4, 6]
    assert scalars(tmp_path, "train/tokens_seen")[-1] == (6, 6 * 512)


@pytest.mark.parametrize(
    ("max_steps", "interval", "validated"),
    [(7, 5, [0, 5, 7]), (3, 250, [0, 3]), (12, "auto", [0, 2, 4, 6, 8, 10, 12])],
)
def test_any_run_length_ends_with_a_validation(
    tmp_path: Path, max_steps: int, interval: int | str, validated: list[int]
) -> None:
    result = run_script(
        "train.py",
        *TINY_RUN,
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={interval}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert val_steps(tmp_path) == validated
    best = next((tmp_path / "checkpoints").glob("best-*.ckpt")).name
    final = scalars(tmp_path, "val/loss")[-1][1]
    assert (
        f"val_loss{final:.4f}" in best or min(v for _, v in scalars(tmp_path, "val/loss")) < final
    )
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == max_steps
    )


def test_legal_but_surely_mistaken_settings_get_a_one_line_warning(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        *TINY_RUN,
        "data.stride=64",  # twice the context: half of the corpus is never trained on
        "optimizer.warmup_steps=50",
        "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path / 'first'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert any("data.stride=64 is longer than model.context_length=32: 50%" in w for w in warnings)
    assert any("optimizer.warmup_steps=50 is more than trainer.max_steps=2" in w for w in warnings)
    resumed = run_script(
        "train.py",
        *TINY_RUN,
        "data.batch_size=4",
        "trainer.max_steps=3",
        f"resume={tmp_path / 'first'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming with data.batch_size=4 where the checkpoint trained with 8" in (
        resumed.stdout + resumed.stderr
    )


def test_the_bigram_learns_at_its_own_learning_rate(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "model=bigram",
        "trainer=cpu",
        "trainer.max_steps=300",
        "callbacks.progress_bar=null",
        "max_new_tokens=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Uniform guessing over pydocs' 103 characters is ln 103 = 4.63; at the shared 4e-4 the
    # table stayed at 4.56 after 1000 steps.
    best = float(re.search(r"Best val loss: ([0-9.]+)", result.stdout).group(1))
    assert best < 3.0
