"""What every pipeline schedule needs around its loop: checked arguments, the communicator, one
forward or backward on a chosen model chunk, and the data-parallel no-sync contexts.

``with PipelineRun(...) as run:`` enters the no-sync context (training only) and, if the loop
raises, leaves it, so a failed schedule leaves no state behind for the next call. The running
model chunk is the schedule's local state, passed to each call that depends on it. ``run.finish()`` returns the schedule's result.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite.parallel.p2p import P2PCommunicator
from megatron_lite.parallel.schedule_orders import ScheduleError, check_microbatches
from megatron_lite.parallel.schedule_stats import ScheduleStats
from megatron_lite.parallel.schedule_steps import as_chunks, backward_step, forward_step, no_sync_context
from megatron_lite.parallel.state import ParallelState, require_state


class PipelineRun:
    def __init__(self, schedule: str, *, forward_step_func, data_iterator, model, num_microbatches: int,
                 seq_length: int, micro_batch_size: int, hidden_size: int,
                 pstate: Optional[ParallelState] = None, forward_only: bool = False, grad_scale=None,
                 dtype=torch.float32, sequence_parallel: bool = False, collect_non_loss_data: bool = False,
                 no_sync_func=None, stats: Optional[ScheduleStats] = None):
        self.pstate = require_state(pstate)
        self.chunks = as_chunks(model)
        vp = len(self.chunks)
        # Every rank checks the same numbers, so all raise together before any transfer.
        check_microbatches(num_microbatches, self.pstate.pp_size, schedule, vp)
        if schedule != "interleaved" and vp != 1:
            raise ScheduleError(f"the {schedule} schedule runs one model chunk per stage, got {vp}; "
                                "use the interleaved schedule for virtual pipeline stages")
        if schedule == "interleaved" and self.pstate.virtual_pp_size != vp:
            raise ScheduleError(f"{vp} model chunks but the parallel state's virtual pipeline size is "
                                f"{self.pstate.virtual_pp_size}; pass virtual_pipeline={vp} to initialize_parallel")
        if None in (seq_length, micro_batch_size, hidden_size):
            raise ScheduleError("pipeline schedules need seq_length, micro_batch_size and hidden_size "
                                "(the shape of the activations sent between stages)")
        seq = seq_length // self.pstate.tp_size if sequence_parallel else seq_length
        self.comm = P2PCommunicator(self.pstate, (seq, micro_batch_size, hidden_size), dtype)
        self.iterators = _iterators_per_chunk(data_iterator, vp, num_microbatches)
        self.forward_step_func, self.num_microbatches = forward_step_func, num_microbatches
        self.forward_only, self.grad_scale = forward_only, grad_scale
        self.collect_non_loss_data = collect_non_loss_data
        self.stats = stats if stats is not None else ScheduleStats(enabled=False)
        self.comm.synchronize_after_wait = self.stats.time_transfers
        self.stats.begin(self.chunks)
        self.store: list = []
        # Data-parallel no-sync, one context per chunk: each chunk's gradient reduction may start in
        # the backward of its own last micro-batch (with interleaving, long before the last backward).
        # A single no_sync_func covers all chunks and ends before the last backward of all.
        if forward_only:
            self._syncs = {}
        elif no_sync_func is None or isinstance(no_sync_func, (list, tuple)):
            funcs = no_sync_func or [None] * vp
            self._syncs = {c: no_sync_context([chunk], fn) for c, (chunk, fn) in enumerate(zip(self.chunks, funcs))}
        else:
            self._syncs = {"all": no_sync_context(self.chunks, no_sync_func)}

    def __enter__(self) -> "PipelineRun":
        for ctx in self._syncs.values():
            ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._end_no_sync()
        return False

    def _end_no_sync(self, key=None) -> None:
        for k in ([key] if key is not None else list(self._syncs)):
            ctx = self._syncs.pop(k, None)
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def forward(self, input_tensor, microbatch: int, chunk: int = 0):
        with torch.set_grad_enabled(not self.forward_only), self.stats.forward(microbatch, chunk, input_tensor):
            return forward_step(self.forward_step_func, self.iterators[chunk], self.chunks[chunk], input_tensor,
                                self.num_microbatches, self.store, self.pstate.is_pipeline_last_stage(chunk),
                                self.collect_non_loss_data)

    def backward(self, input_tensor, output_tensor, output_tensor_grad, microbatch: int, chunk: int = 0,
                 last: bool = False):
        if microbatch == self.num_microbatches - 1:
            self._end_no_sync(chunk)  # this chunk's last backward: its buckets may reduce as they fill
        if last:
            self._end_no_sync("all")
        grad = backward_step(input_tensor, output_tensor, output_tensor_grad, self.grad_scale)
        self.stats.backward(microbatch, chunk)
        return grad

    def finish(self) -> list:
        """The per-micro-batch loss dicts on the last stage, ``[]`` elsewhere."""
        self._end_no_sync()
        self.stats.p2p_seconds = self.comm.seconds_blocked
        return self.store if self.pstate.is_pipeline_last_stage() else []


def _iterators_per_chunk(data_iterator, num_chunks: int, num_microbatches: int):
    """One iterator per model chunk. Megatron passes a list; a single iterator given for several
    chunks is read ``num_microbatches`` times up front so that every chunk sees the same batches."""
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise ScheduleError(f"{len(data_iterator)} data iterators for {num_chunks} model chunks")
        return list(data_iterator)
    if data_iterator is None or num_chunks == 1:
        return [data_iterator] * num_chunks
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    return [iter(batches) for _ in range(num_chunks)]
