"""What a run shows in TensorBoard and leaves in its run dir: scalars, samples, hparams, plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import Callback
from matplotlib.image import imread
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from conftest import CONF_DIR, TINY_RUN, cpu_trainer
from gptlab.model.gpt import GPTConfig, build_model, count_parameters
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.module import GPTLightningModule
from gptlab.training.monitor import TrainingMonitor
from gptlab.training.records import RUN_RECORD
from gptlab.training.run import run
from gptlab.training.settings import model_settings

STEPS = 10
VAL_EVERY = 5
LOG_EVERY = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DictConfig, float]:
    """One in-process run of STEPS steps, validated at step 0 and every VAL_EVERY steps."""
    run_dir = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = [
            *TINY_RUN,
            f"trainer.max_steps={STEPS}",
            f"trainer.val_check_interval={VAL_EVERY}",
            f"trainer.log_every_n_steps={LOG_EVERY}",
        ]
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    return run_dir, cfg, run(cfg)


@pytest.fixture(scope="module")
def events(tiny_run: tuple[Path, DictConfig, float]) -> EventAccumulator:
    accumulator = EventAccumulator(str(tiny_run[0]), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_are_the_ones_a_practitioner_reads_first(events: EventAccumulator) -> None:
    scalars = set(events.Tags()["scalars"])
    train = {"loss", "ppl", "lr", "grad_norm", "tokens_per_sec", "tokens_seen"}
    # The run's record, once, at its last step.
    summary = {"best_val_loss", "val_ppl", "steps", "tokens_seen", "wall_time_s"}
    summary |= {"tokens_per_sec", "untrained_val_loss"}
    # No Lightning counters, no `epoch`, no hp_metric; train/mfu only where a peak is known.
    assert scalars == {f"train/{name}" for name in train} | {"val/loss", "val/ppl"} | {
        f"summary/{name}" for name in summary
    }
    assert all(event.value > 0 for event in events.Scalars("train/tokens_per_sec"))
    assert all(event.value > 0 for event in events.Scalars("train/grad_norm"))


def test_tokens_seen_counts_every_token_trained_on(
    events: EventAccumulator, tiny_run: tuple[Path, DictConfig, float]
) -> None:
    _, cfg, _ = tiny_run
    tokens_per_step = cfg.data.batch_size * cfg.model.context_length
    logged = [(e.step, e.value) for e in events.Scalars("train/tokens_seen")]
    # Every step is labelled with the optimizer steps taken, as checkpoint names are.
    assert [step for step, _ in logged] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for step, value in logged:
        assert value == step * tokens_per_step


def test_text_tab_has_a_sample_of_the_prompt_at_every_validation(
    events: EventAccumulator, tiny_run: tuple[Path, DictConfig, float]
) -> None:
    _, cfg, _ = tiny_run
    samples = events.Tensors("sample/text_summary")
    assert [s.step for s in samples] == list(range(0, STEPS + 1, VAL_EVERY))
    for sample in samples:
        text = tensor_util.make_ndarray(sample.tensor_proto).item().decode()
        assert f"    {cfg.prompt}" in text
        continuation = text.split(f"    {cfg.prompt}", 1)[1]
        assert continuation.strip(), "a continuation follows the prompt"


def test_hparams_tab_has_config_parameter_count_and_val_metrics(
    events: EventAccumulator, tiny_run: tuple[Path, DictConfig, float]
) -> None:
    _, cfg, _ = tiny_run
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert metrics == {"val/loss", "val/ppl"}
    # Named for the tab, not logged again: one point per validation.
    val_steps = [event.step for event in events.Scalars("val/loss")]
    assert val_steps == sorted(set(val_steps))
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optimizer/lr"].number_value == pytest.approx(cfg.optimizer.lr)
    assert hparams["data/batch_size"].number_value == cfg.data.batch_size
    assert hparams["trainer/max_steps"].number_value == STEPS
    # A few columns, all shown (TensorBoard ticks the first five): the model's size and the
    # settings most often changed between runs. The other settings are in hparams.yaml.
    columns = [info.name for info in experiment.experiment.hparam_infos]
    assert columns == ["n_parameters", "optimizer/lr", "data/batch_size", "trainer/max_steps"]
    assert set(hparams) == set(columns)
    saved = yaml.safe_load((Path(cfg.paths.output_dir) / "hparams.yaml").read_text())
    assert saved["model"]["emb_dim"] == cfg.model.emb_dim
    assert saved["optimizer"]["weight_decay"] == cfg.optimizer.weight_decay
    assert saved["data/batch_size"] == cfg.data.batch_size
    checkpoint = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False
    )
    vocab_size = checkpoint["hyper_parameters"]["model"]["vocab_size"]
    settings = model_settings(OmegaConf.to_container(cfg.model), vocab_size)
    with torch.device("meta"):
        model = build_model(GPTConfig(**settings))
    assert hparams["n_parameters"].number_value == count_parameters(model)


def test_run_record_matches_what_run_returns(tiny_run: tuple[Path, DictConfig, float]) -> None:
    run_dir, cfg, result = tiny_run
    record = json.loads((run_dir / RUN_RECORD).read_text())
    assert record["status"] == "completed"
    assert record["best_val_loss"] == result
    assert record["val_ppl"] == pytest.approx(math.exp(result))
    assert record["steps"] == STEPS
    assert record["tokens_seen"] == STEPS * cfg.data.batch_size * cfg.model.context_length
    assert record["tokens_per_sec"] > 0


def test_recorded_losses_match_the_logged_ones_and_travel_in_checkpoints(
    events: EventAccumulator, tiny_run: tuple[Path, DictConfig, float]
) -> None:
    run_dir, _, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("TrainingMonitor")]
    train = state["train_losses"]
    # The steps the loggers write, and only those: the loss is read there and nowhere else.
    assert [step for _, step, _ in train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    logged = events.Scalars("train/loss")
    assert [event.step for event in logged] == [step for _, step, _ in train]
    for event, (_, _, loss) in zip(logged, train, strict=True):
        assert loss == pytest.approx(event.value)
    assert [step for _, step, _ in state["val_losses"]] == list(range(0, STEPS + 1, VAL_EVERY))
    val_logged = {e.value for e in events.Scalars("val/loss")}
    for _, _, loss in state["val_losses"]:
        assert any(loss == pytest.approx(v) for v in val_logged)


def test_loss_plot_is_written_at_the_end_of_the_run(
    tiny_run: tuple[Path, DictConfig, float],
) -> None:
    height, width, channels = imread(tiny_run[0] / "loss.png").shape
    assert height > 100 and width > 100 and channels in (3, 4)


def test_custom_scalars_chart_train_and_val_loss_together(events: EventAccumulator) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    charts = [chart for category in layout.category for chart in category.chart]
    assert [list(chart.multiline.tag) for chart in charts] == [["train/loss", "val/loss"]]


def one_layer_module() -> GPTLightningModule:
    return GPTLightningModule(
        {"vocab_size": 16, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1},
        {"lr": 1e-3},
        CharTokenizer("abcdefghijklmnop").to_dict(),
    )


def test_curves_record_each_logged_optimizer_step_once_under_accumulation(tmp_path: Path) -> None:
    curves = TrainingMonitor()
    module = one_layer_module()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=6,
        accumulate_grad_batches=3,
        log_every_n_steps=2,
        enable_checkpointing=False,
        callbacks=[curves],
    )
    trainer.fit(module, train_dataloaders=random_batches(16, 8, batch_size=4, n=18))
    # Optimizer steps 2, 4 and 6, each once and after its third batch, not at every batch.
    assert [(tokens, step) for tokens, step, _ in curves.train_losses] == [
        (2 * 3 * 32, 2),
        (4 * 3 * 32, 4),
        (6 * 3 * 32, 6),
    ]


class ReplayOverwritesLoss(Callback):
    """What a CUDA graph replay (compile_mode=reduce-overhead) does to a step's loss: the next
    step writes its output into the same buffer, here once every callback has read it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.last_loss.fill_(1e6)


def test_train_loss_survives_its_buffer_being_overwritten(tmp_path: Path) -> None:
    curves = TrainingMonitor()
    module = one_layer_module()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        log_every_n_steps=4,
        enable_checkpointing=False,
        callbacks=[curves, ReplayOverwritesLoss()],
    )
    trainer.fit(module, train_dataloaders=random_batches(16, 8, batch_size=4, n=16))
    ((_, step, loss),) = curves.train_losses
    # The mean of 4 steps' cross-entropies over 16 tokens, near ln(16) = 2.77.
    assert step == 4 and 2.0 < loss < 4.0
