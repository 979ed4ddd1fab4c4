"""The `logger=` group: every metric, the hyperparameters, the samples and the run's summary
reach each logger, offline; a sweep's runs share one MLflow store; a logger that cannot work
stops the run before any data, with one paragraph and exit code 2."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import CONF_DIR, REPO_ROOT, TINY_RUN, job_dir, run_script, script_env
from gptlab.errors import ConfigError
from gptlab.training.loggers import ResumableMLFlowLogger
from gptlab.training.records import RUN_RECORD
from gptlab.training.run import run, validate

mlflow = pytest.importorskip("mlflow", reason='MLflow is not installed: pip install -e ".[mlflow]"')
# W&B's record schema, to find records in its offline files.
wandb_records = pytest.importorskip(
    "wandb.proto.wandb_internal_pb2", reason='W&B is not installed: pip install -e ".[wandb]"'
)

STEPS = 4
# A tiny run: validated at steps 0, 2 and 4, train metrics written at steps 2 and 4.
SHORT_RUN = (
    *TINY_RUN,
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
)
VAL_STEPS = [0, 2, 4]
TRAIN_STEPS = [2, 4]


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """Whatever a run sets in os.environ (W&B's mode, the loggers' offline defaults) is undone,
    so that later tests see the environment they started with."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def compose_run(log_dir: Path, run_dir: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*SHORT_RUN, *overrides, f"paths.log_dir={log_dir}"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    return cfg


def train(log_dir: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    """A run of SHORT_RUN and `overrides` in `<log_dir>/<name>`, in this process; its folder
    and its run_summary.json."""
    run_dir = log_dir / name
    with environment_kept():
        run(compose_run(log_dir, run_dir, *overrides))
    return run_dir, json.loads((run_dir / RUN_RECORD).read_text())


@pytest.fixture(scope="module")
def many_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """logger=many: TensorBoard, CSV and MLflow. (log dir, run dir, run record)"""
    log_dir = tmp_path_factory.mktemp("many")
    return log_dir, *train(log_dir, "job-many", "logger=many")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that have `name`."""
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


def test_many_is_tensorboard_csv_and_mlflow(many_run: tuple[Path, Path, dict]) -> None:
    log_dir, run_dir, _ = many_run
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert (log_dir / "mlflow.db").is_file()
    assert not list(run_dir.glob("wandb"))


def test_csv_holds_every_metric_the_summary_and_the_hyperparameters(
    many_run: tuple[Path, Path, dict],
) -> None:
    _, run_dir, record = many_run
    rows = read_csv(run_dir / "csv" / "version_0" / "metrics.csv")
    assert [step for step, _ in column(rows, "train/loss")] == TRAIN_STEPS
    assert [step for step, _ in column(rows, "val/loss")] == VAL_STEPS
    assert [step for step, _ in column(rows, "train/tokens_per_sec")] == TRAIN_STEPS
    assert column(rows, "summary/best_val_loss") == [
        (STEPS, pytest.approx(record["best_val_loss"]))
    ]
    assert column(rows, "summary/steps") == [(STEPS, STEPS)]
    hparams = yaml.safe_load((run_dir / "csv" / "version_0" / "hparams.yaml").read_text())
    # The module's own hyperparameters (Lightning's), then the config's other key settings.
    assert hparams["model"]["emb_dim"] == 32
    assert hparams["data/batch_size"] == 8
    assert hparams["trainer/max_steps"] == STEPS
    assert hparams["n_parameters"] > 0


def test_mlflow_store_holds_the_run_by_its_folder_name(
    many_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    log_dir, run_dir, record = many_run
    mlflow.set_tracking_uri(f"sqlite:///{log_dir}/mlflow.db")
    (found,) = mlflow.search_runs(experiment_names=["gptlab"]).to_dict("records")
    assert found["tags.mlflow.runName"] == "job-many"
    assert found["tags.run_dir"] == str(run_dir)
    assert found["status"] == "FINISHED"
    assert found["metrics.summary/best_val_loss"] == pytest.approx(record["best_val_loss"])
    assert found["metrics.summary/tokens_seen"] == record["tokens_seen"]
    assert found["params.data/batch_size"] == "8"
    assert float(found["params.optimizer/lr"]) == 1e-3  # model=tiny's
    assert found["params.n_parameters"].isdigit()
    client = mlflow.MlflowClient(f"sqlite:///{log_dir}/mlflow.db")
    history = {
        name: [m.step for m in client.get_metric_history(found["run_id"], name)]
        for name in ("train/loss", "val/loss", "train/grad_norm")
    }
    assert history == {
        "train/loss": TRAIN_STEPS,
        "val/loss": VAL_STEPS,
        "train/grad_norm": TRAIN_STEPS,
    }
    samples = client.list_artifacts(found["run_id"], "sample")
    assert [a.path for a in samples] == [f"sample/step_{s:06d}.md" for s in VAL_STEPS]
    sample = client.download_artifacts(found["run_id"], samples[-1].path, str(tmp_path))
    assert "    Every effort moves you" in Path(sample).read_text()


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    log_dir = tmp_path_factory.mktemp("wandb")
    return train(log_dir, "job-wandb", "logger=wandb")


def has_history_item(data: bytes, name: str, value_json: str = "") -> bool:
    """Whether W&B's records hold a history item `name` (of that value), keyed either way its
    schema allows (wandb 0.31 writes `nested_key`)."""
    items = (
        wandb_records.HistoryItem(key=name, value_json=value_json),
        wandb_records.HistoryItem(nested_key=[name], value_json=value_json),
    )
    return any(item.SerializeToString() in data for item in items)


def test_wandb_runs_offline_into_the_run_folder_and_is_finished(
    wandb_run: tuple[Path, dict],
) -> None:
    import wandb

    run_dir, record = wandb_run
    # Finished, so that the next job of a sweep in this process gets a run of its own.
    assert wandb.run is None
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    # W&B's records, in its protobuf schema: the run, its config items and history items.
    data = records.read_bytes()
    assert wandb_records.RunRecord(display_name="job-wandb").SerializeToString() in data
    assert wandb_records.RunRecord(project="gptlab").SerializeToString() in data
    assert (
        wandb_records.ConfigItem(key="data/batch_size", value_json="8").SerializeToString() in data
    )
    best = json.dumps(record["best_val_loss"])
    assert has_history_item(data, "summary/best_val_loss", best)
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/ppl"):
        assert has_history_item(data, name), name
    tables = [json.loads(p.read_text()) for p in offline.glob("files/media/table/sample_*.json")]
    assert sorted(step for table in tables for step, _ in table["data"]) == VAL_STEPS
    assert all("Every effort moves you" in text for t in tables for _, text in t["data"])


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    """One MLflow run per run folder: resuming (here with more steps) logs into the run the
    first start opened, where a second run of the same name would split its curves."""
    run_dir, _ = train(tmp_path, "job", "logger=mlflow")
    _, record = train(tmp_path, "job", "logger=mlflow", f"resume={run_dir}", "trainer.max_steps=6")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (found,) = mlflow.search_runs(experiment_names=["gptlab"]).to_dict("records")
    assert found["status"] == "FINISHED"
    assert found["metrics.summary/steps"] == record["steps"] == 6
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(found["run_id"], "val/loss")]
    assert steps == [*VAL_STEPS, 6]
    # MLflow keeps a parameter's first value: the resumed start's is not allowed to replace it.
    assert found["params.trainer/max_steps"] == str(STEPS)


def test_a_continued_mlflow_run_runs_again_and_keeps_its_first_parameters(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = ResumableMLFlowLogger(experiment_name="gptlab", tracking_uri=uri)
    first.log_hyperparams({"trainer": {"max_steps": 4}})
    first.finalize("success")
    again = ResumableMLFlowLogger(experiment_name="gptlab", tracking_uri=uri, run_id=first.run_id)
    again.log_hyperparams({"trainer": {"max_steps": 6}, "seed": 1})
    run = mlflow.MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"trainer/max_steps": "4", "seed": "1"}


def test_a_resumed_run_whose_mlflow_run_is_gone_starts_a_new_one(tmp_path: Path) -> None:
    """Resumed against another store (or after the database was deleted), the run the
    checkpoint names is not there: a new MLflow run rather than a failed resume."""
    run_dir, _ = train(tmp_path, "job", "logger=mlflow")
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    _, record = train(
        tmp_path,
        "job",
        "logger=mlflow",
        f"resume={run_dir}",
        "trainer.max_steps=6",
        f"logger.mlflow.tracking_uri={elsewhere}",
    )
    assert record["status"] == "completed"
    mlflow.set_tracking_uri(elsewhere)
    (found,) = mlflow.search_runs(experiment_names=["gptlab"]).to_dict("records")
    assert found["status"] == "FINISHED"
    assert found["metrics.summary/steps"] == 6


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    """W&B gets the first start's run id back, so the resumed start's records (an offline
    folder of their own) sync into the same run."""
    run_dir, _ = train(tmp_path, "job", "logger=wandb")
    train(tmp_path, "job", "logger=wandb", f"resume={run_dir}", "trainer.max_steps=6")
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    ids = {records.name for folder in folders for records in folder.glob("run-*.wandb")}
    assert len(ids) == 1, ids


def test_a_missing_logger_package_is_named_with_its_pip_command(
    compose_train_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for logger, module in (("mlflow", "mlflow"), ("mlflow", "sqlalchemy"), ("wandb", "wandb")):
        with monkeypatch.context() as patched:
            patched.setitem(sys.modules, module, None)  # import fails, as when not installed
            cfg = compose_train_config(*SHORT_RUN, f"logger={logger}")
            with pytest.raises(ConfigError) as err:
                validate(cfg)
        message = str(err.value)
        assert message.startswith(f"logger.{logger} needs the {module} package"), message
        assert f'pip install -e ".[{logger}]"' in message


class Refusing(BaseHTTPRequestHandler):
    """A tracking server that answers, if only with 403."""

    def do_GET(self) -> None:
        self.send_error(403)

    def log_message(self, *args) -> None:
        pass


def test_a_tracking_server_that_answers_passes_the_check(compose_train_config) -> None:
    server = HTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        validate(
            compose_train_config(*SHORT_RUN, "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
        )
    finally:
        server.shutdown()


def test_an_unreachable_tracking_server_stops_the_run_before_any_data(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_script(
        "train.py",
        *SHORT_RUN,
        "logger=mlflow",
        "logger.mlflow.tracking_uri=http://127.0.0.1:9",  # the discard port: nothing listens
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Error: logger.mlflow.tracking_uri='http://127.0.0.1:9' does not answer" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("mlflow.db"))
    assert time.perf_counter() - started < 120


@pytest.mark.slow
def test_a_sweep_shares_one_mlflow_store_and_its_hparams_table_shows_the_swept_key(
    tmp_path: Path,
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        *SHORT_RUN,
        "model.n_layers=1,2",
        "logger=[tensorboard,mlflow]",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["gptlab"]).sort_values("tags.mlflow.runName")
    assert list(runs["tags.mlflow.runName"]) == ["sweep/0-n_layers=1", "sweep/1-n_layers=2"]
    # The module's value (an int) is the one kept: a second value from the swept override
    # ("1.0") would be refused by MLflow and end the run.
    assert list(runs["params.model/n_layers"]) == ["1", "2"]
    assert runs["metrics.summary/best_val_loss"].notna().all()
    events = EventAccumulator(str(job_dir(sweep_dir, 1)))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    # The swept key first (TensorBoard shows the first five columns), the constants such as
    # optimizer/lr and data/batch_size left out.
    columns = [info.name for info in experiment.experiment.hparam_infos]
    assert columns == ["model/n_layers", "n_parameters"]
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["val/loss", "val/ppl"]


NETWORK_AUDIT = """
import sys

def refuse_the_network(event, args):
    unix = event == "socket.connect" and isinstance(args[1], str)
    if event in ("socket.connect", "socket.getaddrinfo") and not unix:
        print("NETWORK", event, args[1:], file=sys.stderr, flush=True)

sys.addaudithook(refuse_the_network)
sys.argv = ["train.py", *sys.argv[1:]]
from gptlab.cli import train
train()
"""


@pytest.mark.slow
def test_mlflow_and_wandb_stay_offline_by_default(tmp_path: Path) -> None:
    wrapper = tmp_path / "train_audited.py"
    wrapper.write_text(NETWORK_AUDIT)
    # As on a user's machine: MLflow keeps quiet by itself under pytest and in CI.
    unset = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "WANDB_ERROR_REPORTING")
    overrides = [*SHORT_RUN, "trainer.max_steps=1", "logger=[mlflow,wandb]"]
    result = subprocess.run(
        [sys.executable, str(wrapper), *overrides, f"paths.log_dir={tmp_path}"],
        cwd=REPO_ROOT,
        env=script_env(dict.fromkeys(unset)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NETWORK" not in result.stderr, result.stderr[-3000:]
