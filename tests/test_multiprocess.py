"""Multi-process training on CPU, as users run it on GPUs: 2 gloo processes under `trainer=ddp`
and `trainer=fsdp` (FSDP2), with clipping and gradient accumulation, through scripts/train.py.

Every run here trains the same global batches from the same initial weights without dropout,
so 2 processes of batch 4 must give the losses of 1 process of batch 8, step for step: after
a kill -9 and a resume, and when a run saved by 2 processes continues on 1 or the other way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY_RUN, run_script, script_env
from test_resume import curve, saved_step, wait_for

MAX_STEPS = 20
RUN = (
    *(o for o in TINY_RUN if not o.startswith(("trainer.", "data.batch_size"))),
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "model.drop_rate=0.0",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.accumulate_grad_batches=2",
    "trainer.gradient_clip_val=0.5",  # below the tiny model's early gradient norms: it clips
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_steps=2",
    "callbacks.sample_text=null",
    "max_new_tokens=1",
)
TWO_PROCESSES = ("trainer.devices=2", "data.batch_size=4")
ONE_PROCESS = ("trainer.devices=1", "data.batch_size=8")
STRATEGIES = ["ddp", "fsdp"]
# fp32 sums in another order: the same losses to within this.
TOLERANCE = 1e-5


def train(run_dir: Path, *overrides: str, strategy: str = "cpu") -> subprocess.CompletedProcess:
    result = run_script(
        "train.py", *RUN, f"trainer={strategy}", *overrides, f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_losses(run_dir: Path, reference: Path, steps: range) -> None:
    losses, expected = curve(run_dir, "train/loss"), curve(reference, "train/loss")
    assert sorted(losses) == list(steps)
    for step in steps:
        assert abs(losses[step] - expected[step]) <= TOLERANCE, (step, losses, expected)
    val, expected_val = curve(run_dir, "val/loss"), curve(reference, "val/loss")
    # Step 0, the untrained model, is validated inside fit, after the strategy wrapped it.
    for step in (0, steps[-1]):
        assert abs(val[step] - expected_val[step]) <= TOLERANCE, (step, val, expected_val)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batch 8, no distributed strategy."""
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    train(run_dir, *ONE_PROCESS)
    return run_dir


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_killed_and_resumed_train_as_one(
    tmp_path: Path, one_process: Path, strategy: str
) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *RUN]
        process = subprocess.Popen(
            [*command, f"trainer={strategy}", *TWO_PROCESSES, f"hydra.run.dir={run_dir}"],
            env=script_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # rank 1 joins rank 0's group: kill -9 takes both
        )
    wait_for(last.is_file, process, "the first step checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < saved_step(last) < MAX_STEPS, "the kill must land mid-run"

    resumed = train(run_dir, *TWO_PROCESSES, f"resume={run_dir}", strategy=strategy)
    assert saved_step(last) == MAX_STEPS
    # Only rank 0 reports, though both ranks share the captured stdout.
    assert resumed.stdout.count("Best val loss:") == 1
    assert resumed.stdout.count("Throughput:") == 1 and "2 x cpu" in resumed.stdout
    # Clipped, accumulated, killed and resumed: the losses of one process at every step.
    assert_same_losses(run_dir, one_process, range(1, MAX_STEPS + 1))
    record = json.loads((run_dir / "run_summary.json").read_text())
    assert record["status"] == "completed" and record["steps"] == MAX_STEPS
    assert (record["device"], record["precision"]) == ("cpu", "32-true")
    assert record["float32_matmul_precision"] == "highest"
    untrained = curve(one_process, "val/loss")[0]
    assert abs(record["untrained_val_loss"] - untrained) <= TOLERANCE

    if strategy != "fsdp":
        return  # a DDP checkpoint is the module's own state dict; FSDP's is gathered from shards
    # The checkpoint is whole: one process samples from it and scores it without the strategy.
    generated = run_script("generate.py", f"ckpt={last}", "prompt=The", "max_new_tokens=5")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip().startswith("The")
    scored = run_script("evaluate.py", f"ckpt={last}", "data=pydocs", "split=val")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "perplexity" in scored.stdout.lower()


@pytest.mark.parametrize(
    ("strategy", "before", "after"),
    # Each direction once, each strategy once: the window order does not depend on the
    # strategy, and the kill-and-resume test loads checkpoints under both.
    [("fsdp", TWO_PROCESSES, ONE_PROCESS), ("ddp", ONE_PROCESS, TWO_PROCESSES)],
    ids=["fsdp-2-to-1", "ddp-1-to-2"],
)
def test_a_run_continues_on_another_number_of_processes(
    tmp_path: Path, one_process: Path, strategy: str, before: tuple, after: tuple
) -> None:
    run_dir = tmp_path / "run"
    half = MAX_STEPS // 2
    # Recomputing activations changes no number, under FSDP's per-block gathers too.
    memory = ("model.activation_checkpointing=true",) if strategy == "fsdp" else ()
    train(run_dir, *before, *memory, f"trainer.max_steps={half}", strategy=strategy)
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == half
    train(run_dir, *after, *memory, f"resume={run_dir}", strategy=strategy)
    # The data continues at the next window of the same order, whatever the split.
    assert_same_losses(run_dir, one_process, range(1, MAX_STEPS + 1))


@pytest.mark.parametrize(
    ("strategy", "check"),
    # Each verdict's reduction once, under each strategy once.
    [("ddp", "log_steps"), ("fsdp", "every_step")],
)
def test_a_nan_on_one_rank_stops_every_rank_before_any_steps(
    tmp_path: Path, strategy: str, check: str
) -> None:
    script = REPO_ROOT / "tests" / "poisoned_fit.py"
    result = subprocess.run(
        [sys.executable, str(script), strategy, check, str(tmp_path)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["message"] == ranks[1]["message"]
    assert ranks[0]["message"].startswith("Training stopped at step 3: the loss is nan")
    # Every step with the bad loss in it was skipped on both ranks (log_steps reads the verdict
    # at step 4, so steps 1, 2 and 4 were taken); the weights stayed finite everywhere.
    taken = [2] if check == "every_step" else [3]
    for rank in ranks:
        assert rank["adamw_steps"] == taken
        assert all(bool(torch.isfinite(w).all()) for w in rank["weights"].values())
    if strategy == "ddp":
        for name, weight in ranks[0]["weights"].items():
            assert torch.equal(weight, ranks[1]["weights"][name]), name


def test_fsdp_runs_the_gpu_recipe_on_two_processes(tmp_path: Path) -> None:
    """bf16-mixed (FSDP2 gathers in bf16, reduces in fp32), fused AdamW, clipping and
    accumulation together, as `trainer=fsdp` runs them on GPUs."""
    run_dir = tmp_path / "run"
    recipe = ("trainer.precision=bf16-mixed", "optimizer.fused=true", "trainer.max_steps=4")
    train(run_dir, *TWO_PROCESSES, *recipe, strategy="fsdp")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # The sharded master weights stay fp32; only the gathered copies are bf16.
    assert {tensor.dtype for tensor in state.values()} == {torch.float32}
    assert all(bool(torch.isfinite(tensor).all()) for tensor in state.values())
    assert json.loads((run_dir / "run_summary.json").read_text())["precision"] == "bf16-mixed"
