"""Sweeps: run records, the ranked summary, and real multiruns of scripts/train.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from matplotlib.image import imread
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import TINY_RUN, job_dir, run_script
from gptlab.cli import exit_on_reported_error
from gptlab.errors import EXIT_CONFIG_ERROR, ConfigError
from gptlab.jobs import job_subdir, write_swept_keys
from gptlab.sweeps.plots import single_numeric_parameter
from gptlab.sweeps.summary import console_table, summary_rows, winner, write_summary
from gptlab.training.records import RUN_RECORD, RunRecord, write_run_record
from gptlab.training.run import run, validate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT_STEPS = 6
# A tiny run cut short: two validations after the untrained one.
SHORT_RUN = (
    *TINY_RUN,
    f"trainer.max_steps={SHORT_STEPS}",
    f"trainer.val_check_interval={SHORT_STEPS // 2}",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def markdown_rows(path: Path) -> list[list[str]]:
    """Cells of the table's body rows."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    height, width, _ = imread(path).shape
    assert height > 100 and width > 100


def fake_run(sweep_dir: Path, name: str, record: RunRecord | None, overrides: list[str]) -> None:
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if record is not None:
        write_run_record(run_dir, record)


def completed(overrides: list[str], loss: float) -> RunRecord:
    return RunRecord("completed", overrides, loss, math.exp(loss), 10, 2560, 3.0)


def test_summary_ranks_completed_runs_first_and_shows_what_was_swept(tmp_path: Path) -> None:
    fixed = "model=tiny"
    fake_run(tmp_path, "0", completed([fixed, "optimizer.lr=0.001"], 3.0), [])
    failed = RunRecord("failed", [fixed, "optimizer.lr=-1"], error="ConfigError: lr bad")
    fake_run(tmp_path, "1", failed, [])
    fake_run(tmp_path, "2", completed([fixed, "optimizer.lr=0.01"], 2.5), [])
    fake_run(tmp_path, "10", None, [fixed, "optimizer.lr=0.1"])
    (tmp_path / "multirun.yaml").write_text("{}")

    csv_path, md_path, png_path = write_summary(tmp_path)

    rows = read_csv(csv_path)
    assert [r["run"] for r in rows] == ["2", "0", "1", "10"]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "unknown"]
    assert rows[0]["overrides"] == "optimizer.lr=0.01", "overrides every run shares are left out"
    assert float(rows[0]["best_val_loss"]) == 2.5
    assert rows[2]["error"] == "ConfigError: lr bad"
    assert rows[3]["overrides"] == "optimizer.lr=0.1", "read from Hydra's overrides.yaml"
    table = markdown_rows(md_path)
    assert [cells[1] for cells in table] == ["2", "0", "1", "10"]
    assert table[0][0] == "1" and table[0][3] == "2.5000"
    assert_png(png_path)


def test_pruned_runs_rank_after_completed_ones_and_before_failed_ones(tmp_path: Path) -> None:
    fake_run(tmp_path, "0", completed(["optimizer.lr=0.001"], 3.0), [])
    pruned = RunRecord("pruned", ["optimizer.lr=0.1"], 2.0, math.exp(2.0), steps=5)
    fake_run(tmp_path, "1", pruned, [])
    fake_run(tmp_path, "2", RunRecord("failed", ["optimizer.lr=-1"], error="ConfigError"), [])
    fake_run(tmp_path, "3", completed(["optimizer.lr=0.01"], 2.5), [])

    csv_path, md_path, png_path = write_summary(tmp_path)

    rows = read_csv(csv_path)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("3", "completed"),
        ("0", "completed"),
        ("1", "pruned"),
        ("2", "failed"),
    ], "a pruned run's loss is from fewer steps: it ranks after every completed run"
    assert "4 runs: 2 completed, 1 pruned, 1 failed" in md_path.read_text()
    assert_png(png_path)


def test_job_directories_are_named_by_the_swept_overrides(tmp_path: Path) -> None:
    write_swept_keys(tmp_path, ["optimizer.lr", "model.drop_rate", "data.stride"])
    overrides = ["model=tiny", "optimizer.lr=0.00024380478036384822", "model.drop_rate=0.1"]
    assert job_subdir(str(tmp_path), 3, overrides) == "3-lr=0.0002438,drop_rate=0.1"
    assert job_subdir(str(tmp_path / "elsewhere"), 4, overrides) == "4"
    write_swept_keys(tmp_path, ["optimizer.lr", "scheduler.lr", "data.path"])
    clash = ["optimizer.lr=1", "scheduler.lr=2", "data.path=a/b c.txt"]
    assert job_subdir(str(tmp_path), 0, clash) == "0-optimizer.lr=1,scheduler.lr=2,path=a_b_c.txt"


def test_plot_uses_the_swept_value_only_when_one_numeric_parameter_varies(
    tmp_path: Path,
) -> None:
    one = tmp_path / "one"
    fake_run(one, "0", completed(["optimizer.lr=0.001", "seed=1"], 3.0), [])
    fake_run(one, "1", completed(["optimizer.lr=0.01", "seed=1"], 2.0), [])
    assert single_numeric_parameter(summary_rows(one)) == "optimizer.lr"
    two = tmp_path / "two"
    fake_run(two, "0", completed(["optimizer.lr=0.001", "seed=1"], 3.0), [])
    fake_run(two, "1", completed(["optimizer.lr=0.01", "seed=2"], 2.0), [])
    assert single_numeric_parameter(summary_rows(two)) is None
    words = tmp_path / "words"
    fake_run(words, "0", completed(["model=tiny"], 3.0), [])
    fake_run(words, "1", completed(["model=char_small"], 2.0), [])
    assert single_numeric_parameter(summary_rows(words)) is None
    for sweep_dir in (one, two, words):
        assert_png(write_summary(sweep_dir)[2])


def test_console_table_shows_the_top_rows_and_names_the_winner(tmp_path: Path) -> None:
    for n, loss in enumerate((3.0, 2.0, 4.0)):
        fake_run(tmp_path, str(n), completed(["model=tiny", f"optimizer.lr=0.00{n + 1}"], loss), [])
    failed = RunRecord("failed", ["model=tiny", "optimizer.lr=-1"], error="ConfigError: lr bad")
    fake_run(tmp_path, "3", failed, [])
    rows = summary_rows(tmp_path)
    lines = console_table(rows, limit=2).splitlines()
    assert lines[0].split()[:3] == ["rank", "run", "best"]
    assert " ".join(lines[1].split()) == "1 1 2.0000 7.39 10 3.0 completed optimizer.lr=0.002"
    assert lines[2].split()[:2] == ["2", "0"]
    assert lines[3] == "... and 2 more"
    assert "ConfigError: lr bad" in console_table(rows)
    assert winner(rows) == "Best: run 1, val loss 2.0000: model=tiny optimizer.lr=0.002"
    assert winner(rows[3:]) == "No run finished with a val loss."


def test_summary_of_a_directory_without_runs_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multirun directory"):
        write_summary(tmp_path)


def test_unknown_optimized_metric_is_rejected_before_training(compose_train_config) -> None:
    cfg = compose_train_config(*TINY_RUN, "optimized_metric=val/acc")
    with pytest.raises(ConfigError, match=r"optimized_metric='val/acc'.*val/loss"):
        validate(cfg)


def test_config_error_ends_a_single_run_but_only_fails_its_job_in_a_sweep(
    compose_train_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @exit_on_reported_error
    def task() -> None:
        raise ConfigError("model.n_heads=3 does not divide model.emb_dim=32")

    with pytest.raises(SystemExit) as exit_info:
        task()
    assert exit_info.value.code == EXIT_CONFIG_ERROR
    cfg = compose_train_config()
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        # An Exception, not SystemExit: Hydra's job runner records it and the sweep goes on.
        with pytest.raises(ConfigError, match=r"model\.n_heads=3"):
            task()
    finally:
        HydraConfig.instance().cfg = None


def test_failed_run_leaves_a_record_with_its_error(compose_train_config, tmp_path: Path) -> None:
    cfg = compose_train_config(*TINY_RUN, "model.n_heads=3")
    with pytest.raises(ConfigError):
        run(cfg)
    record = json.loads((tmp_path / RUN_RECORD).read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith("ConfigError: model.emb_dim=32 is not divisible")
    assert record["best_val_loss"] is None


@pytest.fixture(scope="module")
def grid_sweep_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2x1 grid: a learning rate that learns and one too small to, at one dropout."""
    sweep_dir = tmp_path_factory.mktemp("grid")
    result = run_script(
        "train.py",
        "-m",
        *SHORT_RUN,
        "optimizer.lr=1e-6,3e-3",
        "model.drop_rate=0.0",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result.stdout


@pytest.fixture(scope="module")
def grid_sweep(grid_sweep_output: tuple[Path, str]) -> Path:
    return grid_sweep_output[0]


def test_grid_sweep_gives_each_run_a_directory_named_by_what_it_varies(grid_sweep: Path) -> None:
    jobs = sorted(d.name for d in grid_sweep.iterdir() if (d / ".hydra").is_dir())
    # TensorBoard names a run by its folder: `--logdir <sweep dir>` shows what differs.
    assert jobs == ["0-lr=1e-06", "1-lr=0.003"]
    assert json.loads((grid_sweep / "sweep.json").read_text()) == {"swept": ["optimizer.lr"]}
    for name in jobs:
        run_dir = grid_sweep / name
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert list(run_dir.glob("events.out.tfevents.*"))
        assert json.loads((run_dir / RUN_RECORD).read_text())["status"] == "completed"


def test_swept_keys_are_hparams_columns(grid_sweep: Path) -> None:
    for run_dir, lr in ((job_dir(grid_sweep, "0"), 1e-6), (job_dir(grid_sweep, "1"), 3e-3)):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        )
        assert start.session_start_info.hparams["optimizer/lr"].number_value == pytest.approx(lr)


def test_grid_summary_ranks_the_runs_best_first(grid_sweep: Path) -> None:
    rows = read_csv(grid_sweep / "summary.csv")
    assert len(rows) == 2
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    records = {
        name: json.loads((job_dir(grid_sweep, name) / RUN_RECORD).read_text())
        for name in ("0", "1")
    }
    assert losses == sorted(r["best_val_loss"] for r in records.values())
    # 3e-3 learns in a few steps; 1e-6 barely moves from the untrained model.
    assert rows[0]["overrides"] == "optimizer.lr=0.003"
    assert rows[1]["overrides"] == "optimizer.lr=1e-06"
    for row in rows:
        assert int(row["steps"]) == SHORT_STEPS
        # steps x data.batch_size=8 of TINY_RUN x context_length of model=tiny
        assert int(row["tokens_seen"]) == SHORT_STEPS * 8 * 32
        assert float(row["val_ppl"]) == pytest.approx(math.exp(float(row["best_val_loss"])))
        assert float(row["wall_time_s"]) > 0
    table = markdown_rows(grid_sweep / "summary.md")
    assert [cells[1] for cells in table] == [r["run"] for r in rows]
    assert_png(grid_sweep / "summary.png")


def test_grid_sweep_ends_by_printing_the_ranking_and_the_winner(
    grid_sweep_output: tuple[Path, str],
) -> None:
    sweep_dir, stdout = grid_sweep_output
    best = read_csv(sweep_dir / "summary.csv")[0]
    overrides = json.loads((job_dir(sweep_dir, best["run"]) / RUN_RECORD).read_text())["overrides"]
    assert "optimizer.lr=0.003" in overrides
    assert stdout.count("Sweep of 2 runs, 2 completed") == 1, "printed once, at the end"
    ranking = stdout[stdout.index("Sweep of 2 runs") :].splitlines()
    assert ranking[2].split()[:2] == ["1", best["run"]]
    assert ranking[2].endswith("optimizer.lr=0.003")
    assert ranking[-1].startswith(f"Best: run {best['run']}, val loss ")
    assert ranking[-1].endswith(": " + " ".join(overrides))


def test_failing_trial_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "-m",
        *TINY_RUN,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "model.n_heads=3,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    # Hydra's basic sweeper re-raises the first failure once every job has run.
    assert result.returncode != 0
    assert "model.n_heads=3" in result.stderr
    rows = {r["overrides"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert set(rows) == {"model.n_heads=3", "model.n_heads=2"}
    bad, good = rows["model.n_heads=3"], rows["model.n_heads=2"]
    assert bad["status"] == "failed"
    assert bad["error"].startswith("ConfigError: model.emb_dim=32 is not divisible")
    assert good["status"] == "completed" and int(good["steps"]) == 2
    assert (job_dir(tmp_path, "1") / "checkpoints" / "last.ckpt").is_file()
    assert "ConfigError" in (tmp_path / "summary.md").read_text()
    assert "is not divisible" in (job_dir(tmp_path, "0") / "train.log").read_text()
    # on_multirun_end never runs after the re-raised failure; the ranking still comes, once.
    assert result.stdout.count("Sweep of 2 runs, 1 completed") == 1
    assert result.stdout.rstrip().splitlines()[-1].startswith("Best: run 1, val loss ")
    assert result.stdout.rstrip().endswith("model.n_heads=2")
