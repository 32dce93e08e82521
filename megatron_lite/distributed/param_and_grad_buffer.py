"""Contiguous gradient (and, for ZeRO-1, parameter) buffers cut into buckets (Megatron-LM's
``_ParamAndGradBuffer``).

Every trainable parameter of one model chunk gets a slice of one flat gradient tensor per
(parameter dtype, gradient dtype); ``param.main_grad`` is a view of that slice, so backward
accumulates into memory allocated once, and one collective per bucket reduces many parameters.
Parameters are laid out in reverse order of definition, which is roughly the order backward
produces their gradients, so the first bucket fills first.

Bucket boundaries: a bucket closes once it holds ``bucket_size`` elements; the tied word
embedding always gets a bucket of its own, so that with ZeRO-1 its first- and last-stage copies
are cut across DP ranks identically (their grads are summed over the embedding group after the
reduce-scatter). With ZeRO-1 each parameter starts on a 64-element boundary and each bucket's
length is padded to a multiple of lcm(DP, 128), so every DP rank owns an equal contiguous slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.parallel.params import is_shared_embedding

# torch >= 2.13 names the flat-tensor collectives *_single (the *_tensor names are deprecated).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

PARAM_START_ALIGN = 64  # elements; Megatron's alignment of each parameter under ZeRO-1
BUCKET_ALIGN = 128  # bucket length is a multiple of lcm(DP, this) under ZeRO-1


def default_bucket_size(dp_size: int) -> int:
    """Megatron-LM's default --ddp-bucket-size (elements): max(40M, 1M x DP)."""
    return max(40_000_000, 1_000_000 * dp_size)


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


@dataclass
class Bucket:
    """Parameters whose gradients are reduced by one collective."""
    index: int
    params: List[torch.nn.Parameter]
    start: int  # [start, end) in the buffer, padding included
    end: int
    grad_data: torch.Tensor  # view of the buffer's grads over [start, end)
    param_data: Optional[torch.Tensor] = None  # ZeRO-1: view of the buffer's params over [start, end)
    ready: set = field(default_factory=set)  # ids of params whose last-micro-batch grad has arrived
    grad_handle: Optional[object] = None  # async collective in flight
    param_handle: Optional[object] = None

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int, dp_size: int) -> Tuple[int, int]:
        """[start, end) of the bucket (bucket-local offsets) that ``dp_rank`` owns under ZeRO-1."""
        size = self.numel // dp_size
        return dp_rank * size, (dp_rank + 1) * size


class ParamAndGradBuffer:
    """One flat gradient buffer (and, with ``shard_params``, one flat parameter buffer) for ``params``.

    ``shard_params``: ZeRO-1 layout (aligned starts, padded buckets) and the parameters themselves
    moved into ``param_data`` (``param.data`` becomes a view of it), so that the all-gather after
    the optimizer step writes straight into the model.
    """

    def __init__(self, params: List[torch.nn.Parameter], grad_dtype: torch.dtype, dp_size: int,
                 bucket_size: Optional[int], shard_params: bool):
        self.params = list(params)
        self.param_dtype = self.params[0].dtype
        self.grad_dtype = grad_dtype
        self.dp_size = dp_size
        self.shard_params = shard_params
        device = self.params[0].device
        bucket_divisor = math.lcm(dp_size, BUCKET_ALIGN) if shard_params else 1

        # First pass: offsets. Reverse order approximates the order backward produces grads.
        self.index: Dict[int, Tuple[int, int, int]] = {}  # id(param) -> (start, end, bucket)
        ranges: List[Tuple[int, int, List[torch.nn.Parameter]]] = []
        cursor, bucket_start, current = 0, 0, []

        def close_bucket():
            nonlocal cursor, bucket_start, current
            if current:
                end = _pad(cursor, bucket_divisor)
                ranges.append((bucket_start, end, current))
                cursor = bucket_start = end
                current = []

        for p in reversed(self.params):
            own_bucket = is_shared_embedding(p)
            if own_bucket:
                close_bucket()
            start = _pad(cursor, PARAM_START_ALIGN) if shard_params and current else cursor
            end = start + p.numel()
            self.index[id(p)] = (start, end, len(ranges))
            current.append(p)
            cursor = end
            if own_bucket or (bucket_size is not None and cursor - bucket_start >= bucket_size):
                close_bucket()
        close_bucket()
        self.numel = cursor

        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = None
        if shard_params:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        for p in self.params:
            start, end, _ = self.index[id(p)]
            if self.param_data is not None:
                view = self.param_data[start:end].view(p.shape)
                view.copy_(p.data)
                p.data = view
            p.main_grad = self.grad_data[start:end].view(p.shape)
        self.buckets = [Bucket(i, ps, s, e, self.grad_data[s:e],
                               None if self.param_data is None else self.param_data[s:e])
                        for i, (s, e, ps) in enumerate(ranges)]

    def param_range(self, p: torch.nn.Parameter) -> Tuple[int, int]:
        start, end, _ = self.index[id(p)]
        return start, end

    def bucket_of(self, p: torch.nn.Parameter) -> Bucket:
        return self.buckets[self.index[id(p)][2]]

    def reset(self) -> None:
        """Zero the gradients (no allocation) and forget which were ready."""
        self.grad_data.zero_()
        for b in self.buckets:
            b.ready.clear()


def launch_grad_reduction(bucket: Bucket, dp_group, dp_size: int, reduce_scatter: bool, dp_rank: int,
                          async_op: bool):
    """Average the bucket's grads over DP: all-reduce, or reduce-scatter into the owned slice (ZeRO-1).

    Dividing first keeps fp16 sums in range (Megatron's gradient scaling factor 1/DP)."""
    if dp_size == 1:
        return None
    bucket.grad_data.div_(dp_size)
    if reduce_scatter:
        lo, hi = bucket.shard_range(dp_rank, dp_size)
        return _reduce_scatter(bucket.grad_data[lo:hi], bucket.grad_data, group=dp_group, async_op=async_op)
    return dist.all_reduce(bucket.grad_data, group=dp_group, async_op=async_op)


def launch_param_gather(bucket: Bucket, dp_group, dp_size: int, dp_rank: int, async_op: bool):
    """Every DP rank's updated slice into every rank's parameter buffer (ZeRO-1)."""
    if dp_size == 1:
        return None
    lo, hi = bucket.shard_range(dp_rank, dp_size)
    return _all_gather(bucket.param_data, bucket.param_data[lo:hi], group=dp_group, async_op=async_op)
