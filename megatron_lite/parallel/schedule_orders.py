"""The order in which one pipeline stage runs forward and backward passes, as plain data.

Each schedule in ``schedules.py`` is a loop over p2p calls; the functions here produce the
same (micro-batch, model chunk, 'F'|'B') sequence without running anything, so the orders can
be checked by hand and against what the runtime loops record (``ScheduleStats.order``).
The counting rules (warm-up lengths, chunk ids) live here and the runtime loops call them, so
the two cannot drift apart.

Semantics follow Megatron-LM's ``megatron/core/pipeline_parallel/schedules.py``:
- GPipe: every forward, then every backward (micro-batches in the same order).
- 1F1B: ``min(pp - rank - 1, m)`` warm-up forwards, then one-forward-one-backward, then the
  remaining backwards; at most ``min(pp - rank, m)`` micro-batches are in flight on a stage.
- Interleaved 1F1B: ``v`` model chunks per stage; forwards walk the chunks in groups of ``pp``
  micro-batches (chunk 0 for micro-batches 0..pp-1, chunk 1 for the same ones, ...), backwards
  walk them in reverse chunk order; warm-up is ``(pp - rank - 1) * 2 + (v - 1) * pp``.
"""
from __future__ import annotations

from typing import List, NamedTuple
from megatron_lite.errors import ScheduleError


class Step(NamedTuple):
    kind: str  # 'F' or 'B'
    microbatch: int
    chunk: int = 0


def check_microbatches(num_microbatches: int, pp_size: int, schedule: str, num_chunks: int = 1) -> None:
    """Raise ``ScheduleError`` before any transfer for counts the schedules cannot run.

    Every rank evaluates the same condition on the same numbers, so every rank raises and
    none is left waiting on a peer.
    """
    if num_microbatches < 1:
        raise ScheduleError(f"the number of micro-batches (--global-batch-size / (--micro-batch-size x DP)) "
                            f"must be >= 1, got {num_microbatches}")
    # GPipe and 1F1B run any count, as in Megatron-LM (fewer micro-batches than stages only
    # leaves a larger bubble); the interleaved schedule walks micro-batches in groups of PP.
    if schedule == "interleaved" and num_microbatches % pp_size != 0:
        raise ScheduleError(
            f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be a "
            f"multiple of --pipeline-model-parallel-size ({pp_size}); change --global-batch-size")
    if schedule == "interleaved" and num_chunks < 2:
        raise ScheduleError("the interleaved schedule needs >= 2 model chunks per stage "
                            "(--num-layers-per-virtual-pipeline-stage)")


def _warmup_steady_cooldown(total: int, warmup: int, forward_only: bool, fwd, bwd) -> List[Step]:
    """The shape every schedule shares: forwards 0..warmup-1, then F(warmup + k) B(k) pairs, then
    the remaining backwards; ``fwd(k)`` / ``bwd(k)`` name the k-th forward / backward step."""
    order = [fwd(k) for k in range(warmup)]
    if forward_only:
        return order
    for k in range(total - warmup):
        order += [fwd(warmup + k), bwd(k)]
    order += [bwd(k) for k in range(total - warmup, total)]
    return order


# ---- GPipe: 1F1B whose warm-up is every micro-batch ---------------------------------------
def gpipe_order(pp_size: int, pp_rank: int, num_microbatches: int, forward_only: bool = False) -> List[Step]:
    return _warmup_steady_cooldown(num_microbatches, num_microbatches, forward_only,
                                   lambda k: Step("F", k), lambda k: Step("B", k))


# ---- 1F1B --------------------------------------------------------------------------------
def one_f_one_b_warmup(pp_size: int, pp_rank: int, num_microbatches: int, forward_only: bool = False) -> int:
    if forward_only:
        return num_microbatches
    return min(pp_size - pp_rank - 1, num_microbatches)


def one_f_one_b_order(pp_size: int, pp_rank: int, num_microbatches: int, forward_only: bool = False) -> List[Step]:
    warmup = one_f_one_b_warmup(pp_size, pp_rank, num_microbatches, forward_only)
    return _warmup_steady_cooldown(num_microbatches, warmup, forward_only,
                                   lambda k: Step("F", k), lambda k: Step("B", k))


# ---- interleaved 1F1B --------------------------------------------------------------------
def interleaved_chunk_id(k: int, pp_size: int, num_chunks: int, forward: bool) -> int:
    """Model chunk run at the k-th forward (or backward) step of this stage (Megatron's get_model_chunk_id)."""
    chunk = (k % (pp_size * num_chunks)) // pp_size
    return chunk if forward else num_chunks - chunk - 1


def interleaved_microbatch_id(k: int, pp_size: int, num_chunks: int) -> int:
    """Micro-batch of the k-th forward (or backward) step within its chunk."""
    return (k // (pp_size * num_chunks)) * pp_size + k % pp_size


def interleaved_warmup(pp_size: int, pp_rank: int, num_microbatches: int, num_chunks: int,
                       forward_only: bool = False) -> int:
    total = num_microbatches * num_chunks
    if forward_only or num_microbatches == pp_size:
        # With m == pp there is no steady state: Megatron runs every forward first.
        return total
    return min((pp_size - pp_rank - 1) * 2 + (num_chunks - 1) * pp_size, total)


def interleaved_order(pp_size: int, pp_rank: int, num_microbatches: int, num_chunks: int,
                      forward_only: bool = False) -> List[Step]:
    def step(kind, k):
        return Step(kind, interleaved_microbatch_id(k, pp_size, num_chunks),
                    interleaved_chunk_id(k, pp_size, num_chunks, kind == "F"))

    return _warmup_steady_cooldown(num_microbatches * num_chunks,
                                   interleaved_warmup(pp_size, pp_rank, num_microbatches, num_chunks, forward_only),
                                   forward_only, lambda k: step("F", k), lambda k: step("B", k))


def schedule_order(schedule: str, pp_size: int, pp_rank: int, num_microbatches: int,
                   num_chunks: int = 1, forward_only: bool = False) -> List[Step]:
    if schedule == "gpipe":
        return gpipe_order(pp_size, pp_rank, num_microbatches, forward_only)
    if schedule == "1f1b":
        return one_f_one_b_order(pp_size, pp_rank, num_microbatches, forward_only)
    if schedule == "interleaved":
        return interleaved_order(pp_size, pp_rank, num_microbatches, num_chunks, forward_only)
    raise ScheduleError(f"unknown pipeline schedule {schedule!r}; choose gpipe, 1f1b or interleaved")


def max_in_flight(order: List[Step]) -> int:
    """Most (micro-batch, chunk) pairs forwarded but not yet backwarded at any point of ``order``."""
    live = peak = 0
    for step in order:
        live += 1 if step.kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_fraction(pp_size: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """Idle fraction predicted for 1F1B / interleaved 1F1B: (p - 1) / (m * v) of the ideal time."""
    return (pp_size - 1) / (num_microbatches * num_chunks)
