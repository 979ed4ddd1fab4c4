"""The GPT in plain PyTorch: config, layers, tokenizers, OpenAI's weights.

Importable without Lightning or Hydra, so a trained model goes anywhere PyTorch does.
"""

from gptlab.model.gpt import (
    BigramModel,
    GPTConfig,
    GPTModel,
    KVCache,
    TransformerBlock,
    build_model,
    count_parameters,
)

__all__ = [
    "BigramModel",
    "GPTConfig",
    "GPTModel",
    "KVCache",
    "TransformerBlock",
    "build_model",
    "count_parameters",
]
