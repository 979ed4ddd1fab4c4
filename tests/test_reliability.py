"""Nothing lost: atomic writes, one directory per run, a full disk, signals, moved runs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from conftest import REPO_ROOT, TINY_RUN, cpu_trainer, run_script, script_env
from gptlab.atomic import link_replacing, remove_stale_temporaries
from gptlab.runs import claim_new_dir
from gptlab.training.benchmark import random_batches
from gptlab.training.checkpoints import LAST_CHECKPOINT, AtomicCheckpointIO, RunCheckpoint
from test_callbacks import tiny_module
from test_resume import curve

QUICK_RUN = tuple(o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_")))
# Checkpoints every step, on a model wide enough that a save takes a while to write.
SAVING_RUN = (
    *QUICK_RUN,
    "model.emb_dim=256",
    "model.n_heads=4",
    "trainer.max_steps=400",
    "trainer.val_check_interval=400",
    "trainer.limit_val_batches=1",
    "callbacks.checkpoint.every_n_steps=1",
    "callbacks.sample_text=null",
)


def start(*args: str, log: Path, env: dict[str, str | None] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args],
            cwd=log.parent,
            env=script_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # The new checkpoint is written, but the disk fills up before it reaches the platter.
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert saved_step(path) == 1
    assert list(tmp_path.iterdir()) == [path]


def test_a_link_that_cannot_be_made_changes_nothing(tmp_path: Path) -> None:
    """link_replacing's False (no hard links here, or the source gone) leaves the target as
    it was, and no temporary file, for the caller to write it instead."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"kept")
    assert not link_replacing(tmp_path / "gone.ckpt", target)
    assert target.read_bytes() == b"kept"
    assert list(tmp_path.iterdir()) == [target]
    source = tmp_path / "best.ckpt"
    source.write_bytes(b"new")
    assert link_replacing(source, target)
    assert target.samefile(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


class RecordingIO(AtomicCheckpointIO):
    """gptlab's writer, noting each file it writes and the step it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, int]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.writes.append((Path(path).name, checkpoint["global_step"]))
        super().save_checkpoint(checkpoint, path, storage_options)


def checkpointed_fit(
    tmp_path: Path, every_n_steps: int | None, val_every: int, accumulation: int = 1, **kwargs
) -> tuple[RunCheckpoint, RecordingIO]:
    """8 optimizer steps of a tiny model on 4 batches that it also validates on, so that its
    val loss falls; last.ckpt every `every_n_steps`, validations every `val_every` steps."""
    checkpoint = RunCheckpoint(
        dirpath=str(tmp_path / "checkpoints"),
        every_n_steps=every_n_steps,
        filename="best-step{step}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        **kwargs,
    )
    io = RecordingIO()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=8,
        val_check_interval=val_every * accumulation,
        check_val_every_n_epoch=None,
        accumulate_grad_batches=accumulation,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        plugins=[io],
    )
    loader = random_batches(16, 8, batch_size=2, n=4)
    trainer.fit(tiny_module(lr=1e-2), train_dataloaders=loader, val_dataloaders=loader)
    return checkpoint, io


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_step_is_written_once_and_last_is_a_link_to_a_new_best(
    tmp_path: Path, accumulation: int
) -> None:
    """A checkpoint of GPT-2 small takes seconds to write: the step save that a validation
    follows, and last.ckpt beside a best file of the same step, would write it three times."""
    checkpoint, io = checkpointed_fit(
        tmp_path, every_n_steps=2, val_every=4, accumulation=accumulation
    )
    assert io.writes == [
        ("last.ckpt", 2),
        ("best-step4.ckpt", 4),
        ("last.ckpt", 6),
        ("best-step8.ckpt", 8),
    ]
    last = tmp_path / "checkpoints" / LAST_CHECKPOINT
    assert last.samefile(checkpoint.best_model_path)
    assert saved_step(last) == 8
    assert not list(last.parent.glob(".*.tmp"))


def test_last_holds_every_validation_whether_or_not_it_improved(tmp_path: Path) -> None:
    """mode=max on a falling loss: only the first validation is a best, yet last.ckpt follows
    every validation, which a Ctrl-C right after one must not lose."""
    checkpoint, io = checkpointed_fit(tmp_path, every_n_steps=None, val_every=2, mode="max")
    assert Path(checkpoint.best_model_path).name == "best-step2.ckpt"
    assert io.writes == [
        ("best-step2.ckpt", 2),
        ("last.ckpt", 4),
        ("last.ckpt", 6),
        ("last.ckpt", 8),
    ]


def test_stale_temporaries_are_removed_by_the_next_owner(tmp_path: Path) -> None:
    (tmp_path / ".last.ckpt.123.tmp").write_bytes(b"killed mid-write")
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.ckpt.123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def other_filesystem() -> Path | None:
    """A folder on another filesystem than the temp dir (Lightning's old staging place)."""
    shm = Path("/dev/shm")
    writable = shm.is_dir() and os.access(shm, os.W_OK)
    if writable and shm.stat().st_dev != Path(tempfile.gettempdir()).stat().st_dev:
        return shm
    return None


@pytest.mark.slow
@pytest.mark.skipif(other_filesystem() is None, reason="no writable tmpfs beside the temp dir")
def test_kills_during_saves_on_another_filesystem_leave_a_loadable_checkpoint(
    tmp_path: Path,
) -> None:
    run_dir = Path(tempfile.mkdtemp(dir=other_filesystem(), prefix="gptlab-test-"))
    last = run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    steps = []
    try:
        for attempt in range(3):
            resume = [f"resume={run_dir}"] if last.is_file() else [f"hydra.run.dir={run_dir}"]
            process = start(*SAVING_RUN, *resume, log=tmp_path / f"attempt{attempt}.log")
            before = saved_step(last) if last.is_file() else 0
            wait_for(
                lambda before=before: last.is_file() and saved_step(last) > before,
                process,
                "a save",
            )
            time.sleep(rng.uniform(0.0, 0.4))  # lands at any moment, mid-write included
            process.send_signal(signal.SIGKILL)
            assert process.wait() == -signal.SIGKILL
            steps.append(saved_step(last))  # loads whole, or the assertion fails here
        assert steps == sorted(steps) and steps[-1] > steps[0]
        resumed = run_script("train.py", *SAVING_RUN, f"resume={run_dir}", "trainer.max_steps=2")
        # Max steps below the saved step: nothing to train, but the run starts, owns the
        # directory and clears what the kills left.
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def limit_file_size(limit: int):
    """For a child process: files may not grow past `limit` bytes, as on a nearly full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_stops_the_run_cleanly_and_keeps_every_good_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_script("train.py", *SAVING_RUN, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    size = last.stat().st_size
    resumed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "train.py"),
            *SAVING_RUN,
            "trainer.max_steps=6",
            f"resume={run_dir}",
        ],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size(size // 2),
    )
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert re.search(r"Error: Could not write .*File too large", resumed.stderr)
    assert f"resume={run_dir}" in resumed.stderr and "holds step 3" in resumed.stderr
    assert saved_step(last) == 3
    best = list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert best and all(torch.load(b, weights_only=True)["global_step"] <= 3 for b in best)
    assert not list(run_dir.rglob(".*.tmp")), "no litter"
    assert imread(run_dir / "loss.png").shape[0] > 100
    record = json.loads((run_dir / "run_summary.json").read_text())
    assert record["status"] == "failed" and "File too large" in record["error"]


def test_new_run_directories_are_never_shared(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        dirs = list(pool.map(lambda _: claim_new_dir(tmp_path), range(24)))
    assert len(set(dirs)) == 24
    assert all(Path(d).is_dir() for d in dirs)


@pytest.mark.slow
def test_two_runs_started_together_write_to_two_directories(tmp_path: Path) -> None:
    quick = (*TINY_RUN, "trainer.max_steps=2", f"paths.log_dir={tmp_path / 'outputs'}")
    processes = [start(*quick, log=tmp_path / f"run{i}.log") for i in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    records = sorted((tmp_path / "outputs").glob("*/*/run_summary.json"))
    assert len(records) == 2
    assert all(json.loads(r.read_text())["status"] == "completed" for r in records)


@pytest.mark.slow
def test_a_moved_run_directory_resumes_with_its_best_score_and_new_paths(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "moved"
    first = run_script("train.py", *TINY_RUN, "trainer.max_steps=4", f"hydra.run.dir={old}")
    assert first.returncode == 0, first.stderr[-3000:]
    best_before = json.loads((old / "run_summary.json").read_text())["best_val_loss"]
    shutil.move(old, new)
    resumed = run_script("train.py", *TINY_RUN, "trainer.max_steps=4", f"resume={new}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Best checkpoint: {new}/checkpoints/best-" in resumed.stdout
    assert str(old) not in resumed.stdout
    record = json.loads((new / "run_summary.json").read_text())
    assert record["best_val_loss"] == pytest.approx(best_before)


# Trains until a signal stops it, saving only then.
SIGNAL_RUN = (
    *QUICK_RUN,
    "trainer.max_steps=100000",
    "trainer.val_check_interval=100000",
    "callbacks.checkpoint.every_n_steps=100000",
)


def started_training(run_dir: Path) -> bool:
    """The run has trained (its record says running, and its events hold a train loss)."""
    record = run_dir / "run_summary.json"
    running = record.is_file() and json.loads(record.read_text())["status"] == "running"
    return running and bool(curve(run_dir, "train/loss"))


def test_sigterm_saves_marks_the_run_interrupted_and_says_how_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start(*SIGNAL_RUN, f"hydra.run.dir={run_dir}", log=tmp_path / "run.log")
    wait_for(lambda: started_training(run_dir), process, "training")
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    output = (tmp_path / "run.log").read_text()
    assert "Traceback" not in output
    match = re.search(r"Interrupted by SIGTERM: saved step (\d+) to (\S+)\.", output)
    assert match, output[-2000:]
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == int(match.group(1)) >= 1
    assert f"resume={run_dir}" in output
    record = json.loads((run_dir / "run_summary.json").read_text())
    assert record["status"] == "interrupted" and record["steps"] == int(match.group(1))


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_without_a_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Steps long enough (a wide model) that the second Ctrl-C lands before the first stops it.
    wide = ("model.emb_dim=512", "model.n_heads=4", "data.batch_size=32")
    process = start(*SIGNAL_RUN, *wide, f"hydra.run.dir={run_dir}", log=tmp_path / "run.log")
    wait_for(lambda: started_training(run_dir), process, "training")
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals at once would arrive as one
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    output = (tmp_path / "run.log").read_text()
    assert "Traceback" not in output
    assert "Aborted by a second Ctrl-C, without saving" in output
    # Stopped long before its first checkpoint: no resume= to offer.
    assert "No checkpoint had been saved, so there is nothing to resume." in output
    assert f"resume={run_dir}" not in output


@pytest.mark.slow
def test_slurm_requeue_continues_the_job_in_its_run_directory(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"  # a stand-in for SLURM's, recording how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "outputs" / "slurm-4242"
    process = start(*SIGNAL_RUN, "paths.log_dir=outputs", log=tmp_path / "job.log", env=env)
    wait_for(lambda: started_training(run_dir), process, "training")
    time.sleep(1.0)
    process.send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@90 before the time limit
    assert process.wait(timeout=300) == 128 + signal.SIGUSR1
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "Requeued SLURM job 4242" in (tmp_path / "job.log").read_text()
    step = saved_step(run_dir / "checkpoints" / "last.ckpt")
    # The requeued job runs the same command; SLURM counts the restart.
    restarted = run_script(
        "train.py",
        *QUICK_RUN,
        f"trainer.max_steps={step + 2}",
        "paths.log_dir=outputs",
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "1"},
    )
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == step + 2
    assert list((run_dir / ".hydra").glob("resume-*"))
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["slurm-4242"]


def tree_state(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every folder (None) and file (modification time, content hash) under root."""
    return {
        str(path.relative_to(root)): (
            (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            if path.is_file()
            else None
        )
        for path in sorted(root.rglob("*"))
    }


def finished_run_folder(run_dir: Path) -> Path:
    """A folder as a finished run leaves it. The files need not load: a second process must be
    refused before it reads or writes any of them."""
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / name).write_text(f"the first run's {name}\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"the first run's weights")
    (run_dir / "train.log").write_text("the first run's log\n")
    (run_dir / "run_summary.json").write_text('{"status": "running", "overrides": []}\n')
    return run_dir


@contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock, as a run still training does."""
    with open(run_dir / ".lock", "a+") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda d: [f"hydra.run.dir={d / 'run'}"], id="hydra.run.dir"),
        pytest.param(lambda d: [f"resume={d / 'run'}"], id="resume"),
        pytest.param(
            lambda d: ["-m", f"hydra.sweep.dir={d}", "hydra.sweep.subdir=run"], id="sweep-job"
        ),
    ],
)
def test_a_second_process_refused_by_the_lock_leaves_the_run_folder_byte_for_byte(
    tmp_path: Path, second
) -> None:
    run_dir = finished_run_folder(tmp_path / "run")
    with held(run_dir):
        before = tree_state(run_dir)
        args = second(tmp_path)
        flags = [a for a in args if a.startswith("-")]  # Hydra's flags go first
        overrides = [a for a in args if a not in flags]
        result = run_script("train.py", *flags, *QUICK_RUN, "seed=7", *overrides, cwd=tmp_path)
        after = tree_state(run_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"The run directory {run_dir} is in use by process 4242" in output, output[-3000:]
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the running run's folder changed: {changed}"


@contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """`mount <options> <target>` for the block (root only; skipped where mounting fails)."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here, which this case needs: {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@contextmanager
def read_only_mount(tmp_path: Path) -> Iterator[list[str]]:
    with mounted(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs") as ro:
        yield [f"paths.log_dir={ro / 'outputs'}"]


@contextmanager
def immutable_folder(tmp_path: Path) -> Iterator[list[str]]:
    """chattr +i: not even root may create anything inside."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
    try:
        yield [f"paths.log_dir={folder / 'outputs'}"]
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


@contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[list[str]]:
    folder = tmp_path / "r-x"
    folder.mkdir(mode=0o555)
    try:
        yield [f"paths.log_dir={folder / 'outputs'}"]
    finally:
        folder.chmod(0o755)


@contextmanager
def full_disk(tmp_path: Path) -> Iterator[list[str]]:
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as disk:
        with open(disk / "filler", "wb") as filler, pytest.raises(OSError, match="No space"):
            while True:
                filler.write(b"x" * 65536)
                filler.flush()
        yield [f"paths.log_dir={disk / 'outputs'}"]


@contextmanager
def run_on_a_read_only_mount(tmp_path: Path) -> Iterator[list[str]]:
    run_dir = finished_run_folder(tmp_path / "run")
    with mounted(run_dir, "--bind", str(run_dir)):
        result = subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)])
        if result.returncode != 0:
            pytest.skip("cannot remount a bind mount read-only here")
        yield [f"resume={run_dir}"]


@pytest.mark.parametrize(
    ("place", "words"),
    [
        pytest.param(read_only_mount, ["paths.log_dir=", "read-only file system"], id="ro-mount"),
        pytest.param(immutable_folder, ["paths.log_dir=", "not writable", "lsattr"], id="chattr"),
        pytest.param(
            read_only_folder,
            ["paths.log_dir=", "not writable", "ls -ld"],
            id="chmod-555",
            marks=pytest.mark.skipif(
                os.geteuid() == 0, reason="root writes through chmod 555: see the chattr case"
            ),
        ),
        pytest.param(full_disk, ["paths.log_dir=", "full disk", "bytes free"], id="full-disk"),
        pytest.param(
            run_on_a_read_only_mount,
            ["resume=", "read-only file system", "resume the copy"],
            id="resume-ro-mount",
        ),
    ],
)
def test_an_unwritable_place_is_refused_with_one_paragraph_before_anything_is_written(
    tmp_path: Path, place, words: list[str]
) -> None:
    outside = tmp_path / "cwd"
    outside.mkdir()
    with place(tmp_path) as args:
        before = tree_state(tmp_path)
        result = run_script("train.py", *QUICK_RUN, *args, cwd=outside)
        after = tree_state(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, f"{word!r} not in: {result.stderr}"
    assert before == after, "nothing is written"


STOPPED_BEFORE_TRAINING = "Stopped by Ctrl-C before training started; nothing to resume."


@pytest.mark.parametrize("moment", ["while importing", "once the run folder is claimed"])
def test_ctrl_c_before_training_prints_one_line_and_leaves_nothing_to_resume(
    tmp_path: Path, moment: str
) -> None:
    run_dir = tmp_path / "run"
    process = start(*TINY_RUN, f"hydra.run.dir={run_dir}", log=tmp_path / "run.log")
    if moment == "while importing":
        time.sleep(1.0)  # Python is up, torch and Hydra are still loading
    else:
        # Then come gptlab's imports, the checks, the data and the model, all before training.
        wait_for(lambda: (run_dir / ".hydra" / "config.yaml").is_file(), process, "the claim")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 128 + signal.SIGINT
    output = (tmp_path / "run.log").read_text()
    assert "Traceback" not in output
    assert output.splitlines()[-1] == STOPPED_BEFORE_TRAINING
    assert not (run_dir / "run_summary.json").exists(), "no record claims a resumable run"
    assert not (run_dir / "checkpoints").exists()
