"""Autograd-aware collectives over the tensor-parallel group (Megatron's f and g operators).

Each mapping is a small ``torch.autograd.Function`` whose backward is the conjugate
collective of its forward:

    copy_to_tp                      fwd identity                bwd all-reduce         ("f")
    reduce_from_tp                  fwd all-reduce              bwd identity           ("g")
    scatter_to_tp                   fwd split last dim          bwd all-gather last dim
    gather_from_tp                  fwd all-gather last dim     bwd split last dim
    scatter_to_sequence_parallel    fwd split dim 0             bwd all-gather dim 0
    gather_from_sequence_parallel   fwd all-gather dim 0        bwd reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel  fwd reduce-scatter dim 0  bwd all-gather dim 0

Dim 0 is the sequence dim of Megatron's [seq, batch, hidden] activations. With TP size 1
every mapping is the identity and never touches torch.distributed. Collectives never write
into a tensor the caller still holds: in-place all-reduce works on a private copy, because an
input or upstream gradient may be saved by another autograd node.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import ParallelState, require_state
from megatron_lite.parallel.utils import divide, split_tensor_along_dim

# torch >= 2.6 renamed the single-tensor collectives; keep older versions working.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or getattr(dist, "reduce_scatter_tensor", None))


# ---- raw collectives (no autograd) ---------------------------------------------------------

def _all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=ps.tp_group)
    return out


def _split(x: torch.Tensor, ps: ParallelState, dim: int) -> torch.Tensor:
    """This rank's chunk of ``dim`` (a fresh contiguous tensor, not a view of x)."""
    if ps.tp_size == 1:
        return x
    return split_tensor_along_dim(x, ps.tp_size, dim=dim)[ps.tp_rank].contiguous()


def _gather_first(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-gather along dim 0: rank r's chunk lands at rows [r*n, (r+1)*n)."""
    if ps.tp_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.size(0) * ps.tp_size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if ps.backend == "nccl" and _all_gather_single is not None:
        _all_gather_single(out, x, group=ps.tp_group)
    else:
        dist.all_gather(list(out.chunk(ps.tp_size, dim=0)), x, group=ps.tp_group)
    return out


def _gather_last(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    # Gather along dim 0 (one contiguous buffer), then move the rank axis next to the last dim.
    stacked = _gather_first(x.unsqueeze(0), ps)  # [tp, *x.shape]
    return torch.cat(stacked.unbind(0), dim=-1).contiguous()


def _reduce_scatter_first(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sum over ranks, keep this rank's chunk of dim 0."""
    if ps.tp_size == 1:
        return x
    x = x.contiguous()
    rows = divide(x.size(0), ps.tp_size)
    if ps.backend == "nccl" and _reduce_scatter_single is not None:
        out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, x, group=ps.tp_group)
        return out
    # Gloo lacks a native reduce-scatter on older torch: all-reduce, then keep our rows.
    return _split(_all_reduce(x, ps), ps, 0)


# ---- autograd functions --------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.ps), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return _all_reduce(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split(x, ps, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.ps), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _gather_last(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.ps, -1), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split(x, ps, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.ps), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, tensor_parallel_output_grad):
        ctx.ps = ps
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, ps)

    @staticmethod
    def backward(ctx, grad):
        # When the gathered tensor feeds a TP region (column-parallel matmul), each rank holds
        # a partial gradient of the full sequence: sum them and keep our rows. Otherwise the
        # gradient is already complete and identical on every rank: just keep our rows.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.ps), None, None
        return _split(grad, ctx.ps, 0), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _reduce_scatter_first(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.ps), None


# ---- public API ----------------------------------------------------------------------------

def copy_to_tp(x: torch.Tensor, pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient backward."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _CopyToTP.apply(x, ps)


def reduce_from_tp(x: torch.Tensor, pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Leave a TP region: all-reduce (sum) forward, identity backward."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _ReduceFromTP.apply(x, ps)


def scatter_to_tp(x: torch.Tensor, pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers the gradient."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _ScatterToTP.apply(x, ps)


def gather_from_tp(x: torch.Tensor, pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """All-gather along the last dim (rank order); backward keeps this rank's gradient chunk."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _GatherFromTP.apply(x, ps)


def scatter_to_sequence_parallel(x: torch.Tensor, pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Keep this rank's chunk of dim 0 (sequence); backward all-gathers along dim 0."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _ScatterToSequenceParallel.apply(x, ps)


def gather_from_sequence_parallel(x: torch.Tensor, tensor_parallel_output_grad: bool = True,
                                  pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """All-gather along dim 0; backward reduce-scatters (or, if the consumer is not TP-split,
    just splits) the gradient along dim 0."""
    ps = require_state(pstate)
    if ps.tp_size == 1:
        return x
    return _GatherFromSequenceParallel.apply(x, ps, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor,
                                        pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Sum over TP ranks and keep this rank's chunk of dim 0; backward all-gathers dim 0."""
    ps = require_state(pstate)
    return x if ps.tp_size == 1 else _ReduceScatterToSequenceParallel.apply(x, ps)
