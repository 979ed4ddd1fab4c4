"""quiet_lightning: the messages gptlab has decided are gone, every other one still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from gptlab.training.console import DECIDED_LOG_MESSAGES, DropMessages, quiet_lightning

# What each decided message says, as Lightning 2.6 and torch word it.
DECIDED = (
    "Seed set to 0",
    "GPU available: ",
    "TPU available: ",
    "Tip: For seamless cloud logging",
    "`Trainer(limit_val_batches=1.0)` was configured so",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_steps=3` reached",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "does not have many workers",
    "is smaller than the logging interval",
)
# Messages gptlab has not decided: a surprising setting and a warning about the files.
UNDECIDED = (
    "`Trainer(limit_predict_batches=1)` was configured so 1 batch will be used",
    "exists and is not empty",
)


class ScheduledLinear(L.LightningModule):
    """The smallest module that, like a cosine schedule, asks for the run's length."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches == 3
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def lightning_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Lightning's log records, and no quiet_lightning filters left behind afterwards.

    Lightning's loggers may not propagate to the root logger, where caplog listens.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)
    for name in DECIDED_LOG_MESSAGES:
        logger = logging.getLogger(name)
        for installed in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(installed)


def console_of_a_tiny_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, quiet: bool
) -> str:
    """Everything Lightning logged or warned during a tiny fit that runs into each message."""
    # The workers hint needs more than 2 CPU cores; say the machine has 8.
    monkeypatch.setattr(
        "lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers",
        lambda local_world_size: 7,
    )
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "old.ckpt").touch()
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quiet:
            quiet_lightning()
        L.seed_everything(0)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=3,
            max_epochs=1,
            limit_val_batches=1.0,
            limit_predict_batches=1,
            log_every_n_steps=50,
            logger=CSVLogger(tmp_path),
            callbacks=[ModelCheckpoint(dirpath=checkpoints)],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(ScheduledLinear(), DataLoader(data, batch_size=4))
    return "\n".join([*(str(w.message) for w in caught), *caplog.messages])


def test_lightning_says_all_these_messages_without_quiet_lightning(
    tmp_path: Path, lightning_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = console_of_a_tiny_fit(tmp_path, lightning_logs, monkeypatch, quiet=False)
    for message in (*DECIDED, *UNDECIDED):
        assert message in console


def test_quiet_lightning_drops_the_decided_messages_and_keeps_the_others(
    tmp_path: Path, lightning_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = console_of_a_tiny_fit(tmp_path, lightning_logs, monkeypatch, quiet=True)
    for message in DECIDED:
        assert message not in console
    for message in UNDECIDED:
        assert message in console


def test_quiet_lightning_twice_installs_each_filter_once(
    lightning_logs: pytest.LogCaptureFixture,
) -> None:
    with warnings.catch_warnings():
        quiet_lightning()
        filters = len(warnings.filters)
        quiet_lightning()
        assert len(warnings.filters) == filters
    for name in DECIDED_LOG_MESSAGES:
        installed = [f for f in logging.getLogger(name).filters if isinstance(f, DropMessages)]
        assert len(installed) == 1
