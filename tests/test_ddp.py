"""Data-parallel training on 2 CPU processes (gloo): disjoint data and sweeps (kill, resume
and rank-0 output: test_multiprocess.py).

Plain `strategy=ddp` re-runs `sys.argv` in its children, which inside pytest means pytest
itself; these tests use `ddp_spawn` in-process, or the real scripts/train.py in a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_RUN, cpu_trainer, make_datamodule, run_script
from gptlab.training.module import GPTLightningModule

DDP_CPU = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


class RecordWindows(L.Callback):
    """Saves every training window a rank sees, to compare ranks after the run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.windows: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.windows.append(batch[0].cpu())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        torch.save(torch.cat(self.windows), self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ranks_see_disjoint_windows(tmp_path: Path) -> None:
    # Every window holds distinct numbers, so a window's content identifies it.
    corpus = tmp_path / "numbers.txt"
    corpus.write_text("".join(f"{i:07d}|" for i in range(4001)))
    datamodule = make_datamodule(
        source="text_files",
        path=str(corpus),
        tokenizer="char",
        context_length=32,
        batch_size=16,
        drop_last=False,
    )
    datamodule.setup("fit")
    module = GPTLightningModule(
        {
            "vocab_size": datamodule.tokenizer.vocab_size,
            "context_length": 32,
            "emb_dim": 16,
            "n_heads": 2,
            "n_layers": 1,
        },
        {"lr": 1e-3},
        datamodule.tokenizer.to_dict(),
    )
    trainer = cpu_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[RecordWindows(tmp_path)],
    )
    trainer.fit(module, datamodule=datamodule)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    all_windows = torch.stack([x for x, _ in datamodule.train_dataloader().dataset])
    n = len(all_windows)
    # DistributedSampler gives each rank ceil(n / 2) windows, padding with repeats if n is odd.
    assert len(rank0) == len(rank1) == (n + 1) // 2
    seen = {tuple(w.tolist()) for w in torch.cat([rank0, rank1])}
    assert seen == {tuple(w.tolist()) for w in all_windows}
    shared = {tuple(w.tolist()) for w in rank0} & {tuple(w.tolist()) for w in rank1}
    assert len(shared) <= n % 2


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        *TINY_RUN,
        *DDP_CPU,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "optimizer.lr=1e-3,2e-3",
        f"hydra.sweep.dir={sweep_dir}",
        "paths.log_dir=" + str(tmp_path / "stray"),
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0-lr=0.001", "1-lr=0.002"]
    for job in jobs:
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
    assert result.stdout.count("Best val loss:") == 2
    # A child that started its own sweep or run would have written under paths.log_dir.
    assert not (tmp_path / "stray").exists()
