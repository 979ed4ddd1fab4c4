"""Crashes and restarts: exact resume after SIGKILL, the nan guard, Ctrl-C, determinism."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, TINY_RUN, run_script, script_env
from gptlab.data.datamodule import TokenWindows
from gptlab.data.sampling import ResumableDataLoader, ResumableSampler
from gptlab.training.run import run

MAX_STEPS = 60
RUN = (
    *(o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_"))),
    "model.drop_rate=0.1",  # so the RNG state matters too
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=30",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_steps=10",
    "max_new_tokens=1",
)


def start_script(script: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
            cwd=log.parent,
            env=script_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def curve(run_dir: Path, tag: str) -> dict[int, float]:
    """A scalar by step over every events file of the run, later files overriding earlier."""
    values: dict[int, float] = {}
    for events_file in sorted((run_dir).glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def saved_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_script("train.py", *RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run SIGKILLed right after its first step checkpoint, then resumed with resume=<dir>."""
    work = tmp_path_factory.mktemp("killed")
    run_dir = work / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = start_script("train.py", *RUN, f"hydra.run.dir={run_dir}", log=work / "killed.log")
    wait_for(last.is_file, process, "the first step checkpoint")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 0 < saved_step(last) < MAX_STEPS, (
        "the kill must land mid-run for this test to mean anything"
    )
    # From another folder: a new run directory would appear under its outputs/.
    resumed = run_script("train.py", *RUN, f"resume={run_dir}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (work / "outputs").exists(), "the resumed run made a new run directory"
    return run_dir, resumed.stdout + resumed.stderr


def test_resume_after_kill_matches_an_uninterrupted_run(
    uninterrupted: Path, killed_and_resumed: tuple[Path, str]
) -> None:
    run_dir, output = killed_and_resumed
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS
    assert saved_step(uninterrupted / "checkpoints" / "last.ckpt") == MAX_STEPS
    expected_val, resumed_val = curve(uninterrupted, "val/loss"), curve(run_dir, "val/loss")
    assert max(expected_val) == max(resumed_val) == MAX_STEPS
    assert abs(resumed_val[MAX_STEPS] - expected_val[MAX_STEPS]) <= 1e-4
    # Same data order, dropout masks and optimizer state: the same loss at every step.
    assert curve(run_dir, "train/loss") == curve(uninterrupted, "train/loss")
    assert "not resumable" not in output, "Lightning did not restore the data-loader position"


def test_resume_continues_in_the_same_run_directory(
    killed_and_resumed: tuple[Path, str],
) -> None:
    run_dir, _ = killed_and_resumed
    assert len(list((run_dir).glob("events.out.tfevents.*"))) >= 2
    assert sorted(curve(run_dir, "train/loss")) == list(range(1, MAX_STEPS + 1))
    assert "resume" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    records = list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))
    assert len(records) == 1
    assert f"resume={run_dir}" in records[0].read_text()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        *RUN,
        "optimizer.lr=1e30",
        "callbacks.checkpoint.every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    match = re.search(r"Training stopped at step (\d+): the loss is (nan|inf)", result.stderr)
    assert match, result.stderr[-2000:]
    stopped_at = int(match.group(1))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint, {last} (step {stopped_at - 1}), is kept" in result.stderr
    assert stopped_at >= 2, "a good step must precede the bad one for this test to mean anything"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == stopped_at - 1
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite in the kept checkpoint"


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "interrupted.log"
    process = start_script(
        "train.py",
        *(o for o in RUN if "progress_bar" not in o),  # the bar says the hint
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "callbacks.checkpoint.every_n_steps=100000",
        f"hydra.run.dir={run_dir}",
        log=log,
    )
    wait_for(lambda: "saves a checkpoint after" in log.read_text(), process, "training")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    output = log.read_text()
    assert "Traceback" not in output
    match = re.search(r"Interrupted by Ctrl-C: saved step (\d+) to (\S+)\.", output)
    assert match, output[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert match.group(2) == str(last)
    assert saved_step(last) == int(match.group(1)) >= 1
    assert f"resume={run_dir}" in output


def test_same_seed_gives_the_same_loss_at_every_step(
    compose_train_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    curves = []
    for name in ("first", "second"):
        cfg = compose_train_config(
            *RUN,
            "trainer.max_steps=30",
            "trainer.val_check_interval=20",
            "callbacks.checkpoint.every_n_steps=7",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        run(cfg)
        curves.append(curve(tmp_path / name, "train/loss"))
        # last.ckpt was written at steps 7, 14, 20 (a validation), 21 and 28; the end of
        # training must still leave step 30 in it.
        assert saved_step(tmp_path / name / "checkpoints" / "last.ckpt") == 30
    assert sorted(curves[0]) == list(range(1, 31))
    assert curves[0] == curves[1]


def test_loader_resumes_with_exactly_the_batches_it_had_not_given() -> None:
    windows = TokenWindows(np.arange(1000, dtype=np.uint16), context_length=4, stride=4)

    def loader() -> ResumableDataLoader:
        sampler = ResumableSampler(windows, shuffle=True)
        return ResumableDataLoader(windows, sampler=sampler, batch_size=8, drop_last=True)

    first = loader()
    first.sampler.set_epoch(3)
    batches = iter(first)
    for _ in range(5):
        next(batches)
    state = first.state_dict()
    assert state == {"epoch": 3, "windows": 5 * 8}
    rest = [inputs for inputs, _ in batches]
    assert len(rest) == len(first) - 5

    second = loader()
    second.load_state_dict(state)
    resumed = [inputs for inputs, _ in second]
    assert len(resumed) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(resumed, rest, strict=True))
    assert second.state_dict() == {"epoch": 3, "windows": len(first) * 8}

    # A position saved at the end of an epoch does not cut the next one short.
    third = loader()
    third.load_state_dict({"epoch": 3, "windows": len(first) * 8})
    third.sampler.set_epoch(4)
    assert len(list(third)) == len(first)
