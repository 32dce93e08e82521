"""Global gradient norm across tensor- and pipeline-parallel ranks, and clipping by it.

Every model-parallel rank (TP x PP, ``pstate.mp_group``) holds a slice of one model replica; the
global norm is sqrt of the sum of squares over all of them, each parameter counted once:
- a parameter sharded over TP (attribute ``tensor_model_parallel=True``) is a distinct slice on
  each TP rank, so every rank counts its own;
- a parameter replicated over TP (layer norms, row-parallel biases, position embeddings) has the
  same gradient on every TP rank, so only TP rank 0 counts it;
- the tied word embedding lives on the first and the last pipeline stage (``shared_embedding``);
  after the embedding all-reduce both copies hold the same gradient, so only the first counts it.
Data-parallel replicas hold identical (already averaged) gradients, so no DP reduction is needed,
except under ZeRO-1: there each DP rank holds the gradient of its own slice only, and the sums
run over every rank (``across_dp=True``).
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.params import param_grad, param_is_duplicate


def grads_for_norm(params: Iterable[torch.nn.Parameter], pstate) -> List[torch.Tensor]:
    """Gradients that enter the global norm on this rank (duplicates dropped)."""
    out = []
    for p in params:
        grad = param_grad(p)
        if grad is None:
            continue
        if param_is_duplicate(p, pstate):
            continue
        out.append(grad)
    return out


def model_parallel_all_reduce(value: torch.Tensor, pstate, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``value`` in place over the TP x PP ranks of this replica (a no-op when alone)."""
    if pstate.mp_group is not None and dist.is_initialized() and pstate.tp_size * pstate.pp_size > 1:
        dist.all_reduce(value, op=op, group=pstate.mp_group)
    return value


def grad_stats_all_reduce(value: torch.Tensor, pstate, op=dist.ReduceOp.SUM, across_dp: bool = False):
    """Reduce a gradient statistic over the ranks that together hold every gradient once: this
    replica's TP x PP ranks, or (ZeRO-1, ``across_dp``) all ranks."""
    if across_dp and pstate.world_size > 1 and dist.is_initialized():
        dist.all_reduce(value, op=op)
        return value
    return model_parallel_all_reduce(value, pstate, op=op)


def get_grad_norm(grads_for_norm_: List[torch.Tensor], pstate, norm_type: float = 2.0,
                  across_dp: bool = False) -> float:
    """L2 (or inf) norm of the gradients of the whole model, identical on every rank of the replica."""
    device = grads_for_norm_[0].device if grads_for_norm_ else pstate.device
    if norm_type == float("inf"):
        local = max((g.detach().abs().max().float() for g in grads_for_norm_),
                    default=torch.zeros((), device=device))
        total = torch.as_tensor(local, dtype=torch.float32, device=device).reshape(1)
        return float(grad_stats_all_reduce(total, pstate, dist.ReduceOp.MAX, across_dp).item())
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for g in grads_for_norm_:
        total += torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type
    total = grad_stats_all_reduce(total, pstate, across_dp=across_dp)
    return float(total.item() ** (1.0 / norm_type))


def clip_grads_by_total_norm(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / (total_norm + 1e-6) when that is below 1 (Megatron's rule)."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in params:
            grad = param_grad(p)
            if grad is not None:
                grad.detach().mul_(clip_coeff)


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, pstate,
                   norm_type: float = 2.0, across_dp: bool = False) -> float:
    """Global norm over the model-parallel ranks; clip when ``max_norm > 0``. Returns the norm before clipping."""
    params = list(params)
    total_norm = get_grad_norm(grads_for_norm(params, pstate), pstate, norm_type, across_dp)
    if max_norm > 0:
        clip_grads_by_total_norm(params, max_norm, total_norm)
    return total_norm


def count_zeros(params: Iterable[torch.nn.Parameter], pstate, across_dp: bool = False) -> int:
    """Number of exactly-zero gradient entries in the model, duplicates counted once."""
    params = list(params)
    grads = grads_for_norm(params, pstate)
    device = grads[0].device if grads else pstate.device
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for g in grads:
        total += float(g.numel()) - torch.count_nonzero(g).float()
    return int(grad_stats_all_reduce(total, pstate, across_dp=across_dp).item())
