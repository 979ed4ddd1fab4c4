"""scripts/generate.py on a checkpoint trained here: what it prints and how it fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, run_script
from gptlab.errors import ConfigError
from gptlab.inference.generation import encode_prompt, generate, stream_tokens
from gptlab.inference.loading import find_last_checkpoint, load_checkpoint
from gptlab.jobs import write_swept_keys
from gptlab.training.checkpoints import find_best_checkpoint
from gptlab.training.records import RunRecord, write_run_record


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose outputs/ holds one tiny run, as after `python scripts/train.py`."""
    workdir = tmp_path_factory.mktemp("work")
    run_dir = workdir / "outputs" / "2026-11-22" / "03-00-00"
    result = run_script("train.py", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_ckpt_last_prints_the_greedy_continuation(workdir: Path) -> None:
    result = run_script(
        "generate.py", "ckpt=last", "prompt='def main'", "max_new_tokens=40", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = find_last_checkpoint(workdir / "outputs")
    assert ckpt.parent.parent == workdir / "outputs" / "2026-11-22" / "03-00-00"
    module = load_checkpoint(ckpt)
    prompt = torch.tensor([encode_prompt(module.tokenizer, "def main")])
    expected = module.tokenizer.decode(generate(module.model, prompt, 40)[0].tolist())
    assert result.stdout == expected + "\n"
    assert str(ckpt.relative_to(workdir)) in result.stderr, "says which checkpoint it used"


def test_seeded_samples_are_repeatable(workdir: Path) -> None:
    ckpt = find_last_checkpoint(workdir / "outputs")
    settings = {"temperature": 0.8, "top_k": 10, "top_p": 0.95}
    result = run_script(
        "generate.py",
        f"ckpt={ckpt}",
        "prompt=class",
        "max_new_tokens=30",
        "num_samples=2",
        "seed=5",
        *(f"{key}={value}" for key, value in settings.items()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = load_checkpoint(ckpt)
    prompt = torch.tensor([encode_prompt(module.tokenizer, "class")])
    generator = torch.Generator().manual_seed(5)
    expected = ""
    for sample in (1, 2):
        tokens = stream_tokens(module.model, prompt, 30, generator=generator, **settings)
        text = module.tokenizer.decode(int(token[0]) for token in tokens)
        expected += f"--- sample {sample} of 2 ---\nclass{text}\n"
    assert result.stdout == expected


def test_corrupt_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 cut off mid-write")
    result = run_script("generate.py", f"ckpt={corrupt}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"ckpt='{corrupt}' could not be read as a checkpoint" in result.stderr


def test_ckpt_last_without_runs_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ckpt=last found no last\.ckpt"):
        find_last_checkpoint(tmp_path / "outputs")


def test_char_checkpoint_names_unknown_characters(workdir: Path) -> None:
    module = load_checkpoint(find_last_checkpoint(workdir / "outputs"))
    with pytest.raises(ConfigError, match="'€→'"):
        encode_prompt(module.tokenizer, "price: 5€ → 6€")
    with pytest.raises(ConfigError, match="empty prompt"):
        encode_prompt(module.tokenizer, "")


def test_ckpt_best_samples_from_the_runs_best_checkpoint(workdir: Path) -> None:
    result = run_script("generate.py", "ckpt=best", "prompt=def", "max_new_tokens=5", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (best,) = (workdir / "outputs" / "2026-11-22" / "03-00-00" / "checkpoints").glob("best-*")
    assert f"Sampling from {best.relative_to(workdir)}" in result.stderr


def sweep_job(sweep_dir: Path, name: str, best_val_loss: float) -> Path:
    """A finished job as a sweep leaves it: its record, its best checkpoint, and a last.ckpt
    whose checkpoint callback names that best one (where the job ran before it was moved)."""
    job = sweep_dir / name
    best = job / "checkpoints" / f"best-step5-val_loss{best_val_loss:.4f}.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    callback = {"best_model_path": f"/elsewhere/{name}/checkpoints/{best.name}"}
    last = best.parent / "last.ckpt"
    hparams = {"model": {"vocab_size": 3}, "tokenizer": {"name": "char"}}
    saved = {"global_step": 5, "state_dict": {}, "hyper_parameters": hparams}
    torch.save({**saved, "callbacks": {"RunCheckpoint{}": callback}}, last)
    write_run_record(job, RunRecord("completed", [], best_val_loss=best_val_loss))
    return best


def test_ckpt_best_after_a_sweep_is_its_best_run(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "outputs" / "multirun" / "2026-12-05" / "10-00-00"
    write_swept_keys(sweep_dir, ["optimizer.lr"])
    winner = sweep_job(sweep_dir, "0-lr=0.001", 2.15)
    sweep_job(sweep_dir, "1-lr=0.0003", 2.31)  # the newest job, not the best
    assert find_best_checkpoint(tmp_path / "outputs") == winner
    # Outside a sweep, the newest run's own best.
    single = sweep_job(tmp_path / "outputs" / "2026-12-06", "09-00-00", 3.0)
    assert find_best_checkpoint(tmp_path / "outputs") == single


def test_a_sweep_jobs_checkpoint_path_pastes_back_as_is(workdir: Path, tmp_path: Path) -> None:
    """Sweep job folders are named `0-lr=0.001,drop_rate=0.1`: Hydra's grammar reads `=` and `,`
    in a value as syntax, so gptlab quotes a path value that exists before Hydra sees it."""
    job = tmp_path / "multirun" / "2026-12-05" / "10-00-00" / "0-lr=0.001,drop_rate=0.1"
    shutil.copytree(workdir / "outputs" / "2026-11-22" / "03-00-00" / "checkpoints", job)
    result = run_script(
        "generate.py", f"ckpt={job / 'last.ckpt'}", "max_new_tokens=5", "temperature=0"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Every effort moves you" in result.stdout


def test_a_value_hydra_cannot_read_says_how_to_quote_it(tmp_path: Path) -> None:
    result = run_script("generate.py", "ckpt=last", "prompt=a=b", cwd=tmp_path)
    assert result.returncode == 2
    assert "'prompt=a=b' is not an override Hydra can read" in result.stderr
    assert "\"prompt='a=b'\"" in result.stderr
    assert "Traceback" not in result.stderr
