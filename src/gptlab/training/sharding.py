"""FSDP2 for GPT models in plain PyTorch: shard each block, then the root; gather whole weights.

`trainer=fsdp` runs Lightning's ModelParallelStrategy, which hands the LightningModule a device
mesh in `configure_model`; the module calls `shard_model` with it. Parameters become DTensors
sharded over the mesh, keeping their names and shapes, so state dicts, weight decay by shape
and checkpoints read the same as an unsharded model's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """One FSDP2 unit per TransformerBlock, then the root (embeddings, final norm, head).

    A block's parameters are gathered just before its forward and freed after it, so at most
    one block is whole at a time. `param_dtype` (bf16 under bf16-mixed) is the dtype the
    parameters are gathered and computed in; gradients are reduced in fp32 and the sharded
    master weights stay fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in getattr(model, "trf_blocks", ()):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU: on rank 0 only for a sharded model (a collective that
    every rank must call), the model's own state dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """A norm over sharded gradients is a DTensor still to be reduced over the ranks."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
