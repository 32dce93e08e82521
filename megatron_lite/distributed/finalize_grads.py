"""Gradient reductions between backward and the optimizer step (Megatron's finalize_model_grads).

1. data parallel: every replica computed grads on its own slice of the global batch; the
   global-batch gradient is their mean. A chunk wrapped in ``DistributedDataParallel`` finishes
   its bucketed reduction (all-reduce, or reduce-scatter under ZeRO-1, possibly already under way
   since backward); an unwrapped module gets one coalesced all-reduce;
2. sequence parallel: parameters used on sequence shards (layer norms, row-parallel biases;
   marked ``sequence_parallel=True``) saw only this rank's tokens, so their grads are summed over TP;
3. tied embeddings with PP > 1: the word embedding (first stage) and the output layer (last stage)
   are one weight; each copy gets the sum of both grads (``shared_embedding=True``, embedding group).

Steps 2 and 3 all-reduce ``main_grad`` after step 1, as Megatron-LM does. Under ZeRO-1 only the
owned slice of each bucket is meaningful by then; a sum over TP or over the two embedding copies
keeps that slice right because the slices line up: TP peers share one buffer layout, and the tied
embedding has a bucket of its own on both stages.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite.parallel.params import is_sequence_parallel, is_shared_embedding, param_grad


def all_reduce_coalesced(grads: List[torch.Tensor], group, divide_by: int = 1) -> None:
    """Sum ``grads`` over ``group`` in one collective per dtype, optionally dividing (in place)."""
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for tensors in by_dtype.values():
        flat = _flatten_dense_tensors(tensors)
        if divide_by != 1:
            flat.div_(divide_by)  # divide first: keeps fp16 sums in range, as Megatron does
        dist.all_reduce(flat, group=group)
        for g, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            g.copy_(synced)


def _params(model_chunks) -> Iterable[torch.nn.Parameter]:
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.requires_grad and param_grad(p) is not None:
                yield p


def reduce_data_parallel_grads(model_chunks, pstate) -> None:
    unwrapped = []
    for chunk in model_chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()
        else:
            unwrapped.append(chunk)
    if pstate.dp_size > 1 and unwrapped:
        all_reduce_coalesced([param_grad(p) for p in _params(unwrapped)], pstate.dp_group, pstate.dp_size)


def allreduce_sequence_parallel_grads(model_chunks, pstate) -> None:
    if pstate.tp_size > 1:
        grads = [param_grad(p) for p in _params(model_chunks) if is_sequence_parallel(p)]
        if grads:
            all_reduce_coalesced(grads, pstate.tp_group)


def allreduce_embedding_grads(model_chunks, pstate) -> None:
    if pstate.pp_size > 1 and pstate.embedding_group is not None and pstate.rank in pstate.embedding_ranks:
        grads = [param_grad(p) for p in _params(model_chunks) if is_shared_embedding(p)]
        if grads:
            all_reduce_coalesced(grads, pstate.embedding_group)


def finalize_model_grads(model_chunks, pstate) -> None:
    """All reductions that make every rank's grads those of the full global batch."""
    reduce_data_parallel_grads(model_chunks, pstate)
    allreduce_sequence_parallel_grads(model_chunks, pstate)
    allreduce_embedding_grads(model_chunks, pstate)
