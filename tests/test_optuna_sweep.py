"""Optuna sweeps: search space, storages, resume after a kill, pruning, parallel workers."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason='Optuna is not installed: pip install -e ".[sweep]"')

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from conftest import REPO_ROOT, TINY_RUN, job_dir, run_script, script_env  # noqa: E402
from gptlab.errors import ConfigError, TrainingInterrupted  # noqa: E402
from gptlab.sweeps.optuna_study import (  # noqa: E402
    HEARTBEAT_ATTR,
    fail_stale_trials,
    hyperband_in_steps,
    make_pruner,
    open_storage,
    parse_storage,
)
from gptlab.training.records import RUN_RECORD, status_of  # noqa: E402
from hydra_plugins.gptlab_optuna_sweeper._impl import SearchSpace  # noqa: E402

STEPS = 40
# A tiny Optuna sweep: every trial trains STEPS steps and validates at STEPS / 2 and STEPS.
SWEEP = (
    "hparams_search=optuna",
    *TINY_RUN,
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS // 2}",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
)


def load(storage: str | None, sweep_dir: Path, name: str = "gptlab") -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=open_storage(parse_storage(storage, sweep_dir))
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / RUN_RECORD).read_text())


def test_search_space_reads_hydra_sweep_syntax_and_the_command_line_fixes_or_replaces() -> None:
    params = {
        "optimizer.lr": "tag(log, interval(1e-4, 3e-3))",
        "model.drop_rate": "interval(0.0, 0.2)",
        "data.batch_size": "choice(16, 32, 64)",
        "model.n_layers": "range(1, 8, 2)",
        "optimizer.weight_decay": "interval(0.0, 0.2)",
    }
    arguments = [
        "model=tiny",
        "+extra=1",
        "data.batch_size=8",
        "model.drop_rate=interval(0.1, 0.3)",
    ]

    space = SearchSpace.parse(params, arguments)

    assert space.distributions == {
        "optimizer.lr": FloatDistribution(1e-4, 3e-3, log=True),
        "model.drop_rate": FloatDistribution(0.1, 0.3),
        "model.n_layers": IntDistribution(1, 7, step=2),
        "optimizer.weight_decay": FloatDistribution(0.0, 0.2),
    }
    assert space.fixed == ["model=tiny", "+extra=1", "data.batch_size=8"]
    sampled = {"optimizer.lr": 1e-05, "model.drop_rate": 0.15, "model.n_layers": 3}
    sampled["optimizer.weight_decay"] = 0.0
    assert space.overrides(sampled) == [
        "model=tiny",
        "+extra=1",
        "data.batch_size=8",
        "optimizer.lr=1e-05",
        "model.drop_rate=0.15",
        "model.n_layers=3",
        "optimizer.weight_decay=0.0",
    ]
    grid = SearchSpace.parse({}, ["data.batch_size=16,32", "x=choice(a, b)"])
    assert grid.distributions == {
        "data.batch_size": CategoricalDistribution([16, 32]),
        "x": CategoricalDistribution(["a", "b"]),
    }


def test_storage_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_storage(None, "sweep").path == tmp_path / "sweep" / "optuna.journal"
    assert parse_storage("studies/a.journal", "sweep").path == tmp_path / "studies" / "a.journal"
    assert parse_storage("journal:/nfs/b", "sweep").path == Path("/nfs/b")
    assert parse_storage("x.log", "sweep").path == tmp_path / "x.log"
    assert parse_storage("sqlite:///o.db", "sweep").url == "sqlite:///o.db"
    assert parse_storage("sqlite:///o.db", "sweep").lock_path == Path("o.db.ask-lock")
    assert parse_storage("postgresql://db/x", "sweep").lock_path is None
    with pytest.raises(ConfigError, match=r"storage='study\.db'.*sqlite:///"):
        parse_storage("study.db", "sweep")
    with pytest.raises(ConfigError, match="in-memory"):
        parse_storage("sqlite:///:memory:", "sweep")
    with pytest.raises(ConfigError, match=r"pruner='asha'.*median, hyperband"):
        make_pruner("asha")
    with pytest.raises(ConfigError, match=r"pruner_args\.min_steps .*n_warmup_steps"):
        make_pruner("median", {"min_steps": 3})


def test_hyperband_rungs_default_to_the_first_validation_and_the_run_length() -> None:
    assert hyperband_in_steps({}, 50, 1000) == {"min_resource": 50, "max_resource": 1000}
    given = {"min_resource": 100, "reduction_factor": 4}
    assert hyperband_in_steps(given, 50, 1000) == {**given, "max_resource": 1000}
    assert hyperband_in_steps({}, 50, -1) == {"min_resource": 50}  # Optuna's auto: 1st trial
    with pytest.raises(ConfigError, match=r"fraction of an epoch.*pruner_args\.min_resource"):
        hyperband_in_steps({}, None, 1000)


def test_a_pruned_run_ends_as_pruned_not_failed() -> None:
    pruned = optuna.TrialPruned("Trial 3 pruned at step 50: val/loss 2.9 is not promising")
    assert status_of(pruned) == "pruned"
    assert status_of(ValueError("bad")) == "failed"
    assert status_of(TrainingInterrupted(2, step=5)) == "interrupted"


def test_running_trial_without_a_recent_heartbeat_is_failed(tmp_path: Path) -> None:
    storage = open_storage(parse_storage(None, tmp_path))
    study = optuna.create_study(storage=storage, study_name="s")
    silent, alive = study.ask(), study.ask()
    storage.set_trial_system_attr(silent._trial_id, HEARTBEAT_ATTR, time.time() - 60)
    storage.set_trial_system_attr(alive._trial_id, HEARTBEAT_ATTR, time.time())

    assert fail_stale_trials(study, storage, stale_after_s=30) == [silent.number]

    states = [t.state for t in load(None, tmp_path, "s").trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING]


@pytest.mark.slow
def test_three_trial_sweep_stores_its_study_in_the_sweep_dir(tmp_path: Path) -> None:
    result = run_script(
        "train.py", *SWEEP, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    frame = load(None, tmp_path).trials_dataframe()
    assert list(frame["number"]) == [0, 1, 2]
    assert set(frame["state"]) == {"COMPLETE"}
    rows = read_csv(tmp_path / "summary.csv")
    assert sorted(r["run"] for r in rows) == ["0", "1", "2"], "run dirs are named by trial"
    swept = ["optimizer.lr", "optimizer.weight_decay", "model.drop_rate"]
    for row in rows:
        trial = frame[frame["number"] == int(row["run"])].iloc[0]
        assert float(row["best_val_loss"]) == pytest.approx(trial["value"])
        values = dict(o.split("=") for o in row["overrides"].split())
        assert list(values) == swept, "data.batch_size is fixed by TINY_RUN"
        assert 1e-4 <= float(values["optimizer.lr"]) <= 3e-3
        assert float(values["optimizer.lr"]) == pytest.approx(trial["params_optimizer.lr"])
        run = record(job_dir(tmp_path, row["run"]))
        assert run["status"] == "completed" and run["steps"] == STEPS
    assert json.loads((tmp_path / "sweep.json").read_text()) == {"swept": swept}
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(float(rows[0]["best_val_loss"]))
    assert results["best_trial"] == int(rows[0]["run"])
    assert results["trials"]["complete"] == 3


@pytest.mark.slow
def test_pruning_stops_a_hopeless_trial_and_records_it_as_pruned(tmp_path: Path) -> None:
    """A trial that learns, then one whose learning rate is far too small: the pruner stops
    the second at its first validation. Both sweeps share one sqlite study; the second runs
    its trial in another process (submitit's local launcher), which finds the trial through
    the storage and reports to it from there.

    Hyperband with no pruner_args: with Optuna's own min_resource (1 step) the two trials
    would fall in different brackets and never be compared, and the second would run to the
    end. The median pruner takes the same path from the report on (see the later-validation
    test below)."""
    pruner = ("hydra.sweeper.pruner=hyperband",)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = (
        *SWEEP,
        "optimizer.weight_decay=0.1",
        "model.drop_rate=0.0",
        f"hydra.sweeper.storage={storage}",
        *pruner,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    good = run_script("train.py", *common, "optimizer.lr=3e-3", "hydra.sweeper.n_trials=1")
    assert good.returncode == 0, good.stderr[-3000:]
    bad = run_script(
        "train.py",
        *common,
        "optimizer.lr=1e-7",
        "hydra.sweeper.n_trials=2",
        "hydra/launcher=submitit_local",
    )
    assert bad.returncode == 0, "a pruned trial is not an error: " + bad.stderr[-3000:]

    study = load(storage, tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert list(study.trials[1].intermediate_values) == [STEPS // 2]
    pruned = record(job_dir(tmp_path / "sweep", 1))
    assert pruned["status"] == "pruned"
    assert pruned["steps"] == STEPS // 2
    assert pruned["best_val_loss"] == pytest.approx(study.trials[1].intermediate_values[STEPS // 2])
    assert pruned["error"].startswith("TrialPruned: Trial 1 pruned at step 20")
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("0", "completed"), ("1", "pruned")]


def test_a_trial_pruned_at_a_later_validation_records_its_best_val_loss_so_far(
    tmp_path: Path,
) -> None:
    """Pruned at its second validation, before the checkpoint callback saw that validation's
    score: the record and the summary still count it."""
    sweep_dir = tmp_path / "sweep"
    study = optuna.create_study(
        storage=open_storage(parse_storage(None, sweep_dir)), study_name="gptlab"
    )
    # A finished trial far better at every validation: the median pruner's yardstick.
    study.add_trial(
        optuna.trial.create_trial(value=0.5, intermediate_values={10: 0.5, 20: 0.5, 40: 0.5})
    )
    result = run_script(
        "train.py",
        *SWEEP,
        "trainer.val_check_interval=10",
        "optimizer.lr=3e-3",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=median",
        "+hydra.sweeper.pruner_args.n_startup_trials=1",
        "+hydra.sweeper.pruner_args.n_warmup_steps=11",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    reported = load(None, sweep_dir).trials[1].intermediate_values
    assert list(reported) == [10, 20]
    assert reported[20] < reported[10], "the trial must still be learning at step 20"
    pruned = record(job_dir(sweep_dir, 1))
    assert (pruned["status"], pruned["steps"]) == ("pruned", 20)
    assert pruned["best_val_loss"] == pytest.approx(reported[20])
    row = read_csv(sweep_dir / "summary.csv")[0]
    assert float(row["best_val_loss"]) == pytest.approx(reported[20], abs=1e-4)


@pytest.mark.slow
def test_failing_trials_are_told_fail_and_the_sweep_fails_only_if_all_did(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        *SWEEP,
        "model.n_heads=3",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode != 0
    assert "model.n_heads=3" in result.stderr
    assert [t.state for t in load(None, tmp_path).trials] == [TrialState.FAIL] * 2
    assert [r["status"] for r in read_csv(tmp_path / "summary.csv")] == ["failed", "failed"]


def start_sweep(*args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args],
            cwd=REPO_ROOT,
            env=script_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_sweep_resumes_its_study_when_run_again(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = (
        *SWEEP,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.stale_after_s=3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    first = start_sweep(*command, log=tmp_path / "first.log")
    try:
        # Trial 1 has started training (its record says so) and not finished.
        wait_for(
            lambda: any(
                (d / RUN_RECORD).is_file() and record(d)["status"] == "running"
                for d in sweep_dir.glob("1-*")
            ),
            timeout=120,
            what="trial 1 to start",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kept = record(job_dir(sweep_dir, 0))

    again = run_script("train.py", *command)

    assert again.returncode == 0, again.stderr[-3000:]
    study = load(None, sweep_dir)
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ], "n_trials=3 counts the whole study: one more trial after the kill"
    assert study.trials[0].value == pytest.approx(kept["best_val_loss"])
    assert record(job_dir(sweep_dir, 0)) == kept, "finished trials are not run again"
    assert "no heartbeat" in study.trials[1].user_attrs["fail_reason"]
    assert record(job_dir(sweep_dir, 1))["status"] == "running", "killed: it never said otherwise"
    assert record(job_dir(sweep_dir, 2))["status"] == "completed"


@pytest.mark.slow
def test_two_workers_share_one_journal_and_split_the_trials(tmp_path: Path) -> None:
    journal = tmp_path / "shared.journal"
    command = (
        *SWEEP,
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={journal}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    workers = [start_sweep(*command, log=tmp_path / f"worker{i}.log") for i in range(2)]
    for worker in workers:
        worker.wait(timeout=240)

    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    launched = [{int(n) for n in re.findall(r"\t#(\d+) : ", log)} for log in logs]
    assert all(launched), f"each worker runs trials: {launched}"
    assert launched[0].isdisjoint(launched[1]), "no trial runs twice"
    assert launched[0] | launched[1] == {0, 1, 2, 3}
    study = load(str(journal), tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    params = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(params) == 4, "the workers do not repeat each other's random draws"


def test_bad_sweep_setting_stops_before_any_trial(tmp_path: Path) -> None:
    result = run_script(
        "train.py", *SWEEP, "hydra.sweeper.storage=study.db", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: hydra.sweeper.storage='study.db' is neither")
    assert "Traceback" not in result.stderr
    assert not [d for d in tmp_path.iterdir() if d.is_dir()], "no trial ran"


def good_journal(path: Path) -> bytes:
    """A journal as a sweep writes it: a study with one finished trial."""
    study = optuna.create_study(storage=open_storage(parse_storage(str(path), path.parent)))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    return path.read_bytes()


DAMAGED_STUDIES = {
    "journal-of-garbage": (
        "study.journal",
        lambda path: bytes(range(256)) * 8,
        ["study.journal is not an Optuna journal: line 1"],
    ),
    "journal-of-plain-text": (
        "study.journal",
        lambda path: b"some notes\nabout the sweep\n",
        ["study.journal is not an Optuna journal: line 1"],
    ),
    "journal-cut-short": (
        "study.journal",
        lambda path: good_journal(path)[:-10],
        ["study.journal ends in a record cut short", "truncate -s "],
    ),
    "sqlite-not-a-database": (
        "study.db",
        lambda path: b"not a database\n" * 100,
        ["study.db cannot be opened as an Optuna study database", "file is not a database"],
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGED_STUDIES))
def test_a_damaged_study_is_refused_with_one_paragraph_naming_the_file(
    tmp_path: Path, damage: str
) -> None:
    name, content, words = DAMAGED_STUDIES[damage]
    study = tmp_path / name
    study.write_bytes(content(study))
    damaged = study.read_bytes()
    storage = f"sqlite:///{study}" if name.endswith(".db") else str(study)
    result = run_script(
        "train.py",
        *SWEEP,
        "hydra.sweeper.n_trials=1",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "holds no runs" not in output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, f"{word!r} not in {result.stderr}"
    assert study.read_bytes() == damaged, "the study is left as it was"


def test_the_command_that_repairs_a_cut_journal_keeps_every_whole_record(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    whole = good_journal(journal)
    journal.write_bytes(whole + b'{"op_code":6,"worker_id":"a')  # a writer cut off
    with pytest.raises(ConfigError, match="cut short") as refusal:
        open_storage(parse_storage(str(journal), tmp_path))
    repair = re.search(r"`(truncate -s \d+ \S+)`", str(refusal.value))
    assert repair, str(refusal.value)
    subprocess.run(repair.group(1).split(), check=True)
    assert journal.read_bytes() == whole
    storage = open_storage(parse_storage(str(journal), tmp_path))
    study = optuna.load_study(study_name=None, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_optuna_search_composes_with_the_slurm_launcher(compose_train_config) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra")
    cfg = compose_train_config("hparams_search=optuna", "hydra/launcher=submitit_slurm")
    assert cfg.hydra.sweeper._target_.endswith("GptlabOptunaSweeper")
    assert cfg.hydra.sweeper.storage is None
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.callbacks.optuna_pruning._target_ == "gptlab.sweeps.pruning.OptunaPruning"


def test_hydra_finds_the_sweeper_as_installed_without_src_on_the_path(tmp_path: Path) -> None:
    # As a user runs it after `pip install -e .`: no PYTHONPATH=src, as the other tests have.
    env = script_env()
    env.pop("PYTHONPATH")
    listing = (
        "from gptlab.cli import expose_hydra_plugins\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "expose_hydra_plugins()\n"
        "print(*(p.__name__ for p in Plugins.instance().discover(Sweeper)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", listing], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GptlabOptunaSweeper" in result.stdout.split()
