"""Data parallelism over one model chunk (Megatron-LM's ``DistributedDataParallel``).

    chunk = DistributedDataParallel(module, pstate, DDPConfig(...))
    chunk.zero_grad_buffer()                 # once per step, before the first micro-batch
    with chunk.no_sync(): ...backward...     # earlier micro-batches: accumulate only
    ...last micro-batch's backward...        # with overlap: buckets reduce as they fill
    chunk.finish_grad_sync()                 # before the optimizer (finalize_model_grads)

A hook after each parameter's gradient accumulation adds ``param.grad`` into ``param.main_grad``
(the contiguous buffer) and drops ``param.grad``, so backward allocates no lasting gradient.
With ``overlap_grad_reduce`` the last micro-batch's hooks count the gradients of each bucket;
a full bucket starts its collective at once (asynchronously) while backward goes on. Without
it, ``finish_grad_sync`` runs one collective per bucket after backward.

With ``use_distributed_optimizer`` (ZeRO-1) the reduction is a reduce-scatter: each DP rank
ends up with the averaged gradient of its own slice of every bucket only; the optimizer
(``distrib_optimizer.py``) updates that slice and all-gathers the parameters back, which with
``overlap_param_gather`` is waited for bucket by bucket just before the next forward needs it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megatron_lite.distributed.param_and_grad_buffer import (ParamAndGradBuffer, default_bucket_size,
                                                             launch_grad_reduction, launch_param_gather)


@dataclass
class DDPConfig:
    overlap_grad_reduce: bool = False
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = None  # elements; None: Megatron's default with overlap, else one bucket
    grad_reduce_in_fp32: bool = True  # fp16/bf16 models accumulate and reduce grads in fp32


class DistributedDataParallel(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, pstate, ddp_config: DDPConfig,
                 on_collective: Optional[Callable[[str, int], None]] = None):
        super().__init__()
        self.module = module
        self.pstate = pstate
        self.ddp_config = ddp_config
        self.on_collective = on_collective  # instrumentation: called with ("grad", bucket index) on launch
        dp = pstate.dp_size
        bucket_size = ddp_config.bucket_size
        if bucket_size is None and ddp_config.overlap_grad_reduce:
            bucket_size = default_bucket_size(dp)

        by_dtype: Dict[tuple, List[torch.nn.Parameter]] = {}
        for p in module.parameters():
            if p.requires_grad:
                grad_dtype = torch.float32 if ddp_config.grad_reduce_in_fp32 else p.dtype
                by_dtype.setdefault((p.dtype, grad_dtype), []).append(p)
        self.grad_buffers: List[ParamAndGradBuffer] = [
            ParamAndGradBuffer(ps, grad_dtype, dp, bucket_size, ddp_config.use_distributed_optimizer)
            for (_, grad_dtype), ps in by_dtype.items()]
        self._buffer_of: Dict[int, ParamAndGradBuffer] = {id(p): buf for buf in self.grad_buffers for p in buf.params}
        self.is_last_microbatch = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_accumulated)
                       for buf in self.grad_buffers for p in buf.params]
        if ddp_config.overlap_param_gather:
            self._hooks += [m.register_forward_pre_hook(self._wait_for_params) for m in module.modules()]

    # ---- what the schedules and the trainer call ---------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches run inside only accumulate; the next backward outside reduces."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def zero_grad_buffer(self) -> None:
        for buf in self.grad_buffers:
            buf.reset()
        for buf in self.grad_buffers:
            for p in buf.params:
                p.grad = None

    def start_grad_sync(self) -> None:
        """Launch every bucket's reduction not launched yet."""
        for buf in self.grad_buffers:
            for b in buf.buckets:
                if b.grad_handle is None:
                    self._launch(buf, b)

    def finish_grad_sync(self) -> None:
        """Wait until every bucket is reduced (launching those the hooks did not)."""
        self.start_grad_sync()
        for buf in self.grad_buffers:
            for b in buf.buckets:
                if b.grad_handle is not None and b.grad_handle is not True:
                    b.grad_handle.wait()
                b.grad_handle = None

    def start_param_sync(self, async_op: bool) -> None:
        """ZeRO-1: all-gather the updated parameter slices (asynchronously with overlap_param_gather)."""
        ps = self.pstate
        for buf in self.grad_buffers:
            for b in buf.buckets:
                b.param_handle = launch_param_gather(b, ps.dp_group, ps.dp_size, ps.dp_rank, async_op)

    def finish_param_sync(self) -> None:
        for buf in self.grad_buffers:
            for b in buf.buckets:
                if b.param_handle is not None:
                    b.param_handle.wait()
                    b.param_handle = None

    # ---- hooks --------------------------------------------------------------------------------
    def _grad_accumulated(self, param: torch.nn.Parameter) -> None:
        if param.grad is None:
            return
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.ddp_config.overlap_grad_reduce and self.is_last_microbatch:
            buf = self._buffer_of[id(param)]
            bucket = buf.bucket_of(param)
            if bucket.grad_handle is not None:
                raise RuntimeError(f"a gradient of bucket {bucket.index} arrived after its reduction started; "
                                   "a parameter used twice in one backward cannot overlap its reduction")
            bucket.ready.add(id(param))
            if len(bucket.ready) == len(bucket.params):
                self._launch(buf, bucket)

    def _launch(self, buf: ParamAndGradBuffer, bucket) -> None:
        ps = self.pstate
        if self.on_collective is not None:
            self.on_collective("grad", bucket.index)
        handle = launch_grad_reduction(bucket, ps.dp_group, ps.dp_size, self.ddp_config.use_distributed_optimizer,
                                       ps.dp_rank, async_op=self.ddp_config.overlap_grad_reduce)
        bucket.grad_handle = True if handle is None else handle  # True: done (DP == 1 or synchronous)

    def _wait_for_params(self, module, _inputs) -> None:
        for p in module.parameters(recurse=False):
            buf = self._buffer_of.get(id(p))
            if buf is not None:
                b = buf.bucket_of(p)
                if b.param_handle is not None:
                    b.param_handle.wait()
                    b.param_handle = None

    # ---- the wrapped module -------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, tensor) -> None:
        self.module.set_input_tensor(tensor)

    def state_dict(self, *args, **kwargs):
        self.finish_param_sync()  # a checkpoint must not catch an all-gather half done
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.finish_param_sync()
        return self.module.load_state_dict(state_dict, strict=strict)


def describe_buckets(model_chunks, ddp_config: DDPConfig) -> str:
    """One line for the startup log: how the gradients are reduced."""
    buckets = [b for c in model_chunks for buf in c.grad_buffers for b in buf.buckets]
    sizes = [b.numel for b in buckets]
    how = "reduce-scatter (ZeRO-1)" if ddp_config.use_distributed_optimizer else "all-reduce"
    when = "overlapped with backward" if ddp_config.overlap_grad_reduce else "after backward"
    dtypes = sorted({str(buf.grad_data.dtype).replace("torch.", "") for c in model_chunks for buf in c.grad_buffers})
    return (f"gradients in {len(buckets)} bucket(s) of {min(sizes, default=0):,}-{max(sizes, default=0):,} "
            f"elements ({'/'.join(dtypes)}), {how} {when}")
