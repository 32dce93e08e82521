"""The parallel attributes set on parameters, and the predicates that read them.

The layers mark each parameter once, when they build it:
- ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``: split over TP along a
  dimension (False: replicated on every TP rank);
- ``sequence_parallel``: used on sequence shards under sequence parallelism, so its grad must be
  summed over TP (layer norms, row-parallel biases);
- ``shared_embedding``: one of the two copies of the tied word embedding (first and last stage).

Clipping, parameter counting, gradient reduction and the optimizer's fp32 masters read them
through the functions here, so every rule about them lives in one place.
"""
from __future__ import annotations

from typing import Optional

import torch

# Every attribute the parallel core may set; the mixed-precision masters copy them.
PARALLEL_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
                  "shared_embedding")


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int,
                                         stride: int = 1) -> None:
    """Mark how ``tensor`` is split over TP ranks."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def mark_sequence_parallel(param: torch.Tensor, value: bool = True) -> None:
    """``param`` sees only this rank's sequence chunk: its grad is summed over TP before the step."""
    param.sequence_parallel = value


def mark_shared_embedding(param: torch.Tensor) -> None:
    """``param`` is one copy of the tied word embedding: its grad is summed over the embedding group."""
    param.shared_embedding = True


def copy_parallel_attributes(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Give ``dst`` (an fp32 master, say) every parallel attribute ``src`` carries."""
    for attr in PARALLEL_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "sequence_parallel", False))


def is_shared_embedding(param: torch.Tensor) -> bool:
    return bool(getattr(param, "shared_embedding", False))


def param_is_tp_duplicate(param: torch.Tensor, pstate) -> bool:
    """True for a replicated (not TP-split) parameter on TP rank > 0: count it once, on rank 0."""
    return not is_tensor_parallel(param) and pstate.tp_rank > 0


def param_is_shared_duplicate(param: torch.Tensor, pstate) -> bool:
    """True for the last stage's copy of the tied word embedding when PP > 1."""
    return is_shared_embedding(param) and pstate.pp_size > 1 and pstate.pp_rank != 0


def param_is_duplicate(param: torch.Tensor, pstate) -> bool:
    """Counted elsewhere in the model replica (norms, parameter counts count it once)."""
    return param_is_tp_duplicate(param, pstate) or param_is_shared_duplicate(param, pstate)


def param_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient the optimizer uses: ``main_grad`` (the data-parallel buffer's fp32 view) when
    set, else ``param.grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad
