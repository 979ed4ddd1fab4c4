"""A 2-process CPU fit whose loss is nan on rank 1 alone at step 3; run by test_multiprocess.py.

Usage: python tests/poisoned_fit.py {ddp,fsdp} {every_step,log_steps} <out dir>. Lightning
starts rank 1 by running this script again. Each rank saves what the nan guard told it and
its own weights and AdamW step counts to <out dir>/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from gptlab.errors import NonFiniteLossError
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.benchmark import random_batches
from gptlab.training.callbacks import NonFiniteLossGuard
from gptlab.training.module import GPTLightningModule

POISONED_STEP = 3


class PoisonedModule(GPTLightningModule):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.trainer.global_step + 1 == POISONED_STEP:
            return loss * float("nan")
        return loss


def main(strategy_name: str, check: str, out: Path) -> None:
    torch.manual_seed(0)
    module = PoisonedModule(
        {"vocab_size": 16, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2},
        {"lr": 1e-3, "fused": check == "log_steps"},
        CharTokenizer("abcdefghijklmnop").to_dict(),
    )
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if strategy_name == "fsdp"
        else "ddp"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=8,
        log_every_n_steps=4,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[NonFiniteLossGuard(check=check)],
    )
    message = None
    try:
        trainer.fit(module, train_dataloaders=random_batches(16, 8, batch_size=2, n=32))
    except NonFiniteLossError as err:
        message = str(err)
    optimizer = trainer.optimizers[0]
    torch.save(
        {
            "message": message,
            "weights": {
                name: getattr(p, "to_local", lambda p=p: p)().detach()
                for name, p in module.named_parameters()
            },
            "adamw_steps": sorted({int(state["step"]) for state in optimizer.state.values()}),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
