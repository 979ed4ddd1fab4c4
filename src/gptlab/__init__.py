"""gptlab: train GPT language models from scratch with PyTorch Lightning and Hydra.

The classes people import are here too, loaded on first use, so that `import gptlab.model`
stays plain PyTorch: `from gptlab import GPTLightningModule, GPTModel, GPTConfig`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> the module that defines it.
EXPORTS = {
    "GPTConfig": "gptlab.model.gpt",
    "GPTModel": "gptlab.model.gpt",
    "GPTLightningModule": "gptlab.training.module",
    "GPTDataModule": "gptlab.data.datamodule",
}
__all__ = list(EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
