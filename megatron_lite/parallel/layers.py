"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Each layer allocates only its shard, but initialises it from a full fp32 master weight built on
CPU by ``init_method`` and then sliced (Megatron's CPU initialisation), so every TP degree starts
from exactly the same model. Parameter names are ``weight`` / ``bias`` as in nn.Linear and
nn.Embedding, so state dicts line up with the single-process model.

Linear layers return ``(output, output_bias)`` as in Megatron: ``output_bias`` is the bias when
``skip_bias_add`` (the caller fuses the add, e.g. into bias-dropout-add), else None.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tp,
)
from megatron_lite.parallel.params import mark_sequence_parallel, set_tensor_model_parallel_attributes
from megatron_lite.parallel.state import ParallelState, require_state
from megatron_lite.parallel.utils import divide, vocab_range_for_rank

InitMethod = Callable[[torch.Tensor], object]

# ---- init methods ----------------------------------------------------------------------------

def init_method_normal(std: float, seed: Optional[int] = None) -> InitMethod:
    """Fill a full weight in place with N(0, std).

    With ``seed`` every call draws from a fresh ``torch.Generator`` seeded with it, so a
    parameter's values depend only on its seed, not on how many parameters were built before it
    on this rank (pipeline stages build different subsets of the model).
    """
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        if seed is None:
            return nn.init.normal_(tensor, mean=0.0, std=std)
        gen = torch.Generator(device=tensor.device).manual_seed(int(seed))
        with torch.no_grad():
            return tensor.normal_(mean=0.0, std=std, generator=gen)
    return init_


def _init_sharded_weight(param: nn.Parameter, full_shape: Tuple[int, int], partition_dim: int,
                         init_method: InitMethod, ps: ParallelState) -> None:
    """Build the full master weight on CPU in fp32, then copy this rank's slice into ``param``."""
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    shard = master.chunk(ps.tp_size, dim=partition_dim)[ps.tp_rank]
    with torch.no_grad():
        param.copy_(shard)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim)


class _SharedState:
    """Holds a layer's ParallelState so that copy.deepcopy(model) shares the process groups
    (they cannot be copied) instead of failing."""
    __slots__ = ("value",)

    def __init__(self, value: ParallelState):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class _TPModule(nn.Module):
    @property
    def pstate(self) -> ParallelState:
        return self._pstate.value


def _resolve(pstate: ParallelState, device) -> Tuple[ParallelState, torch.device]:
    ps = require_state(pstate)
    return ps, torch.device(device) if device is not None else ps.device


# ---- layers ----------------------------------------------------------------------------------

def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           sequence_parallel: bool, pstate: ParallelState) -> torch.Tensor:
    """Enter the TP region and multiply by this rank's output-feature shard ``weight``.

    Every rank's gradient w.r.t. x covers only its shard's outputs, so the backward sums it over
    TP (``copy_to_tp``) or, with sequence parallelism, gathers the sequence on the way in and
    reduce-scatters that gradient on the way out. Also the tied LM head's logits (Megatron's
    parallel_lm_logits), which multiply by the word-embedding shard.
    """
    if sequence_parallel:
        x = gather_from_sequence_parallel(x, tensor_parallel_output_grad=True, pstate=pstate)
    else:
        x = copy_to_tp(x, pstate)
    return F.linear(x, weight, bias)


class ColumnParallelLinear(_TPModule):
    """Y = X A^T + b with A split by rows (output features) over TP ranks.

    forward(x[s, b, in]) -> (y[s, b, out/tp] or, with gather_output, y[s, b, out], bias|None).
    With ``sequence_parallel`` the input arrives as [s/tp, b, in] and is all-gathered along the
    sequence first; its gradient is reduce-scattered back.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 init_method: Optional[InitMethod] = None, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 pstate: Optional[ParallelState] = None, device=None):
        super().__init__()
        ps, device = _resolve(pstate, device)
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is incompatible with sequence_parallel "
                             "(the output stays split over the TP group)")
        self._pstate = _SharedState(ps)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, ps.tp_size)
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel and ps.tp_size > 1

        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               dtype=params_dtype, device=device))
        _init_sharded_weight(self.weight, (output_size, input_size), 0,
                             init_method or init_method_normal(0.02), ps)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype,
                                                 device=device))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``weight`` overrides the layer's own (same shard shape), e.g. a tied word embedding."""
        weight = self.weight if weight is None else weight
        if weight.shape != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"ColumnParallelLinear: weight shard {tuple(weight.shape)} != "
                             f"{(self.output_size_per_partition, self.input_size)}")
        bias = None if self.skip_bias_add else self.bias
        out = column_parallel_linear(x, weight, bias, self.sequence_parallel, self.pstate)
        if self.gather_output:
            out = gather_from_tp(out, self.pstate)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={self.pstate.tp_size}, bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TPModule):
    """Y = X A^T + b with A split by columns (input features) over TP ranks.

    forward(x[s, b, in/tp] (or [s, b, in] with input_is_parallel=False)) -> (y[s, b, out], bias|None).
    Partial products are summed over TP (or reduce-scattered along the sequence with
    ``sequence_parallel``); the bias is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 init_method: Optional[InitMethod] = None, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 pstate: Optional[ParallelState] = None, device=None):
        super().__init__()
        ps, device = _resolve(pstate, device)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel requires input_is_parallel=True")
        self._pstate = _SharedState(ps)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, ps.tp_size)
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel and ps.tp_size > 1

        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=params_dtype, device=device))
        _init_sharded_weight(self.weight, (output_size, input_size), 1,
                             init_method or init_method_normal(0.02), ps)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=False, dim=-1)
            # Under sequence parallelism each rank's bias grad covers only its sequence chunk:
            # the trainer all-reduces grads of params carrying this flag over the TP group.
            mark_sequence_parallel(self.bias, self.sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.pstate)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel(partial, self.pstate)
        else:
            out = reduce_from_tp(partial, self.pstate)
        if self.skip_bias_add:
            return out, self.bias
        if self.bias is not None:
            out = out + self.bias
        return out, None

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={self.pstate.tp_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TPModule):
    """Embedding table split by vocabulary rows over TP ranks.

    forward(ids[b, s]) -> [b, s, dim]. Each rank looks up the ids in its own range, writes zeros
    for the rest, and the TP all-reduce sums the one non-zero contribution per token.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: Optional[InitMethod] = None,
                 params_dtype: torch.dtype = torch.float32, pstate: Optional[ParallelState] = None,
                 device=None):
        super().__init__()
        ps, device = _resolve(pstate, device)
        self._pstate = _SharedState(ps)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start_index, self.vocab_end_index = vocab_range_for_rank(num_embeddings, ps.tp_rank,
                                                                            ps.tp_size)
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype, device=device))
        _init_sharded_weight(self.weight, (num_embeddings, embedding_dim), 0,
                             init_method or init_method_normal(0.02), ps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pstate.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(partial, self.pstate)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tp={self.pstate.tp_size}")
