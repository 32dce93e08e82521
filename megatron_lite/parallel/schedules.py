"""Forward/backward schedules over micro-batches: no pipelining, GPipe, 1F1B, interleaved 1F1B.

Megatron-LM's interface::

    fb = get_forward_backward_func(cfg)          # Config, ParallelConfig or ParallelState
    losses = fb(forward_step_func=step, data_iterator=it, model=chunks, num_microbatches=m,
                seq_length=s, micro_batch_size=b, hidden_size=h)

``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)``; on the last stage
``loss_func(output_tensor) -> (loss, {"lm loss": loss.detach()})`` with ``loss`` averaged over
the micro-batch's tokens. Each schedule divides the loss by ``num_microbatches`` before
backward, so gradients accumulate to the mean over this data-parallel rank's global batch. The
return value is the list of per-micro-batch loss dicts on the last stage, ``[]`` elsewhere.

Each pipeline schedule is a plain loop over ``p2p`` calls in the order that ``schedule_orders``
writes down (GPipe and 1F1B share one loop: GPipe is 1F1B with every micro-batch in warm-up);
``PipelineRun`` holds what the loops have in common. GPipe and 1F1B run any number of
micro-batches (fewer than stages only widens the bubble); interleaving needs a multiple of PP.
Pass ``stats=ScheduleStats()`` to record the order actually
run and the activation memory held between a micro-batch's forward and its backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_lite.parallel import schedule_orders as orders
from megatron_lite.parallel.pipeline_run import PipelineRun
from megatron_lite.parallel.schedule_orders import ScheduleError, check_microbatches
from megatron_lite.parallel.schedule_stats import ScheduleStats
from megatron_lite.parallel.schedule_steps import (as_chunks, backward_step, deallocate_output_tensor,
                                                   forward_step, no_sync_context)
from megatron_lite.parallel.state import ParallelState

__all__ = ["get_forward_backward_func", "forward_backward_no_pipelining",
           "forward_backward_pipelining_gpipe", "forward_backward_pipelining_without_interleaving",
           "forward_backward_pipelining_with_interleaving", "forward_step", "backward_step",
           "deallocate_output_tensor", "ScheduleStats", "ScheduleError"]


# ---- choosing a schedule ---------------------------------------------------------------------
def get_forward_backward_func(source, schedule: Optional[str] = None) -> Callable:
    """The schedule for a layout: ``source`` is a Config, a ParallelConfig or a ParallelState.

    PP == 1 runs without pipelining; otherwise ``schedule`` or the config's
    ``pipeline_schedule`` ('gpipe' | '1f1b' | 'interleaved') decides; a ParallelState with a
    virtual pipeline size picks 'interleaved', else '1f1b'.
    """
    par = getattr(source, "parallel", source)  # a full Config carries .parallel
    if isinstance(par, ParallelState):
        pp = par.pp_size
        schedule = schedule or ("interleaved" if par.virtual_pp_size is not None else "1f1b")
    else:
        pp = par.pipeline_model_parallel_size
        schedule = schedule or par.pipeline_schedule or (
            "interleaved" if par.num_layers_per_virtual_pipeline_stage is not None else "1f1b")
    if pp == 1:
        return forward_backward_no_pipelining
    try:
        return {"gpipe": forward_backward_pipelining_gpipe,
                "1f1b": forward_backward_pipelining_without_interleaving,
                "interleaved": forward_backward_pipelining_with_interleaving}[schedule]
    except KeyError:
        raise ScheduleError(f"--pipeline-schedule {schedule!r} is unknown; choose gpipe, 1f1b or interleaved") from None


# ---- no pipelining ---------------------------------------------------------------------------
def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: int = None, micro_batch_size: int = None,
                                   hidden_size: int = None, pstate: Optional[ParallelState] = None,
                                   forward_only: bool = False, grad_scale=None, dtype=torch.float32,
                                   sequence_parallel: bool = False, collect_non_loss_data: bool = False,
                                   no_sync_func=None, stats: Optional[ScheduleStats] = None) -> list:
    """Gradient accumulation over micro-batches on one stage (PP == 1).

    The activation shape, ``pstate``, ``dtype`` and ``sequence_parallel`` are accepted so that every
    schedule takes the same arguments; nothing is sent, so they are unused here.
    """
    chunks = as_chunks(model)
    if len(chunks) != 1:
        raise ScheduleError("without pipelining the model is one module (got %d chunks)" % len(chunks))
    check_microbatches(num_microbatches, 1, "no-pipelining")
    model = chunks[0]
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = data_iterator[0]
    stats = stats if stats is not None else ScheduleStats(enabled=False)
    stats.begin(chunks)
    store: list = []

    def one(i):
        with torch.set_grad_enabled(not forward_only), stats.forward(i, 0):
            out = forward_step(forward_step_func, data_iterator, model, None, num_microbatches, store,
                               True, collect_non_loss_data)
        if not forward_only:
            backward_step(None, out, None, grad_scale)
            stats.backward(i, 0)

    with no_sync_context(chunks, no_sync_func):
        for i in range(num_microbatches - 1):
            one(i)
    one(num_microbatches - 1)  # outside no_sync: its backward triggers the DP grad reduction
    return store


# ---- pipelines -------------------------------------------------------------------------------
# Each pipeline schedule opens ``PipelineRun(schedule, **locals())`` as its first statement: at that
# point locals() holds exactly the keyword arguments, which the three schedules share.

def forward_backward_pipelining_gpipe(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                      seq_length: int, micro_batch_size: int, hidden_size: int,
                                      pstate: Optional[ParallelState] = None, forward_only: bool = False,
                                      grad_scale=None, dtype=torch.float32, sequence_parallel: bool = False,
                                      collect_non_loss_data: bool = False, no_sync_func=None,
                                      stats: Optional[ScheduleStats] = None) -> list:
    """GPipe: all forwards, then all backwards; every micro-batch's activations are held at once.

    That is 1F1B whose warm-up covers every micro-batch (no steady state), so it runs 1F1B's loop.
    """
    with PipelineRun("gpipe", **locals()) as run:
        _one_f_one_b(run, warmup=num_microbatches)
        return run.finish()


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
        micro_batch_size: int, hidden_size: int, pstate: Optional[ParallelState] = None,
        forward_only: bool = False, grad_scale=None, dtype=torch.float32, sequence_parallel: bool = False,
        collect_non_loss_data: bool = False, no_sync_func=None, stats: Optional[ScheduleStats] = None) -> list:
    """1F1B: warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    with PipelineRun("1f1b", **locals()) as run:
        ps = run.pstate
        _one_f_one_b(run, orders.one_f_one_b_warmup(ps.pp_size, ps.pp_rank, num_microbatches, forward_only))
        return run.finish()


def _one_f_one_b(run: PipelineRun, warmup: int) -> None:
    """``warmup`` forwards, then alternate forward / backward, then the remaining backwards."""
    comm, m, forward_only = run.comm, run.num_microbatches, run.forward_only
    remaining = m - warmup
    inputs, outputs = [], []
    is_last = run.pstate.is_pipeline_last_stage()

    for i in range(warmup):
        x = comm.recv_forward()
        y = run.forward(x, i)
        comm.send_forward(y)
        if not forward_only:
            inputs.append(x)
            outputs.append(y)
            if not is_last:
                deallocate_output_tensor(y)

    x = comm.recv_forward() if remaining > 0 else None
    for i in range(remaining):
        last_iteration = i == remaining - 1
        y = run.forward(x, warmup + i)
        if forward_only:
            comm.send_forward(y)
            x = None if last_iteration else comm.recv_forward()
            continue
        dy = comm.send_forward_recv_backward(y)
        inputs.append(x)
        outputs.append(y)
        if not is_last:
            deallocate_output_tensor(y)
        dx = run.backward(inputs.pop(0), outputs.pop(0), dy, i, last=warmup == 0 and last_iteration)
        if last_iteration:
            comm.send_backward(dx)
        else:
            x = comm.send_backward_recv_forward(dx)

    if not forward_only:
        for i in range(remaining, m):  # popping frees each micro-batch's graph as soon as it is done
            dy = comm.recv_backward()
            dx = run.backward(inputs.pop(0), outputs.pop(0), dy, i, last=i == m - 1)
            comm.send_backward(dx)


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
        micro_batch_size: int, hidden_size: int, pstate: Optional[ParallelState] = None,
        forward_only: bool = False, grad_scale=None, dtype=torch.float32, sequence_parallel: bool = False,
        collect_non_loss_data: bool = False, no_sync_func=None, stats: Optional[ScheduleStats] = None) -> list:
    """Interleaved 1F1B over ``len(model)`` chunks per stage (Megatron's ordering and transfers).

    Chunk c of stage r holds virtual stage ``c * pp + r``; activations leave the last rank's
    chunk c for rank 0's chunk c + 1 (p2p neighbours wrap around the ring).
    """
    with PipelineRun("interleaved", **locals()) as run:
        comm, ps, m = run.comm, run.pstate, num_microbatches
        pp, vp = ps.pp_size, len(run.chunks)
        total = m * vp
        warmup = orders.interleaved_warmup(pp, ps.pp_rank, m, vp, forward_only)
        all_warmup = warmup == total
        remaining = total - warmup
        inputs = [[] for _ in range(vp)]
        outputs = [[] for _ in range(vp)]
        output_grads = [[] for _ in range(vp)]
        first_rank = ps.is_pipeline_first_stage()
        last_rank = ps.is_pipeline_last_stage()

        def chunk_of(k, forward):
            return orders.interleaved_chunk_id(k, pp, vp, forward)

        def mb_of(k):
            return orders.interleaved_microbatch_id(k, pp, vp)

        def forward_k(k):
            c = chunk_of(k, True)
            if ps.is_pipeline_first_stage(c) and len(inputs[c]) == len(outputs[c]):
                inputs[c].append(None)  # the first virtual stage reads tokens, not activations
            y = run.forward(inputs[c][-1], mb_of(k), c)
            outputs[c].append(y)
            if forward_only:
                inputs[c].pop()
                outputs[c].pop()
            return y

        def backward_k(k):
            c = chunk_of(k, False)
            if ps.is_pipeline_last_stage(c) and not output_grads[c]:
                output_grads[c].append(None)  # the last virtual stage starts from its loss
            return run.backward(inputs[c].pop(0), outputs[c].pop(0), output_grads[c].pop(0), mb_of(k), c,
                                last=k == total - 1)

        def sendable_output(y, k):
            """Output of forward k, or None when its chunk is the last virtual stage (nothing to send)."""
            if ps.is_pipeline_last_stage(chunk_of(k, True)):
                return None
            return y

        inputs[0].append(comm.recv_forward(chunk=0))
        for k in range(warmup):
            y = sendable_output(forward_k(k), k)
            next_c = chunk_of(k + 1, True)
            recv_prev = not (first_rank and next_c == 0) and k != total - 1
            if k == warmup - 1 and not forward_only and not all_warmup:
                x, dy = comm.send_forward_backward_recv_forward_backward(y, None, recv_prev, not last_rank)
                output_grads[vp - 1].append(dy)
            else:
                x = comm.send_forward_recv_forward(y, recv_prev)
            if recv_prev:
                inputs[next_c].append(x)
            if y is not None and not forward_only:
                deallocate_output_tensor(outputs[chunk_of(k, True)][-1])

        for k in range(remaining):
            fk, bk = k + warmup, k
            y = sendable_output(forward_k(fk), fk)
            dx = backward_k(bk)
            if ps.is_pipeline_first_stage(chunk_of(bk, False)):
                dx = None  # the first virtual stage has no predecessor to send to
            # Which chunk the next received activation / gradient belongs to (Megatron's rule).
            recv_prev = True
            if first_rank:
                next_fc = chunk_of(fk - (pp - 1), True)
                recv_prev = next_fc != vp - 1
                next_fc += 1
            else:
                next_fc = chunk_of(fk + 1, True)
            recv_next = True
            if last_rank:
                next_bc = chunk_of(bk - (pp - 1), False)
                recv_next = next_bc != 0
                next_bc -= 1
            else:
                next_bc = chunk_of(bk + 1, False)
            if k == remaining - 1:
                recv_prev = False
            x, dy = comm.send_forward_backward_recv_forward_backward(y, dx, recv_prev, recv_next)
            if y is not None:
                deallocate_output_tensor(outputs[chunk_of(fk, True)][-1])
            if recv_prev:
                inputs[next_fc].append(x)
            if recv_next:
                output_grads[next_bc].append(dy)

        if not forward_only:
            if all_warmup:
                output_grads[vp - 1].append(comm.recv_backward(chunk=vp - 1))
            for k in range(remaining, total):
                dx = backward_k(k)
                if ps.is_pipeline_first_stage(chunk_of(k, False)):
                    dx = None
                next_bc = chunk_of(k + 1, False)
                recv_next = not (last_rank and next_bc == vp - 1) and k != total - 1
                dy = comm.send_backward_recv_backward(dx, recv_next)
                if recv_next:
                    output_grads[next_bc].append(dy)
        return run.finish()
