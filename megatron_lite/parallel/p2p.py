"""Point-to-point transfers of activations and their gradients between neighbouring stages.

Every transfer is one ``communicate`` call: post the sends and receives toward the previous
and the next stage together, then wait for all of them. Posting everything before waiting is
what keeps the combined calls (send forward + receive backward, ...) free of deadlock: two
neighbours that both send before they receive would block each other with blocking calls.

The shape is fixed by the config (``[seq (/ TP with sequence parallelism), micro_batch, hidden]``),
so no shapes are exchanged per micro-batch. Received activations require grad: the stage's
backward produces their gradient, which is what goes back to the previous stage.

Neighbours are ``pstate.pp_next_rank`` / ``pp_prev_rank`` and wrap around the ring, which is how
the interleaved schedule moves activations from the last rank's chunk c to rank 0's chunk c + 1.
With two stages next == prev, so the two directions use distinct tags (gloo matches messages
by source and tag) and every rank posts activations before gradients (NCCL matches by order).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import ParallelState, require_state

# Tags by direction of travel: activations move forward, gradients backward.
FORWARD_TAG = 1
BACKWARD_TAG = 2


class P2PError(RuntimeError):
    """A transfer with a neighbouring stage failed or timed out (usually: that stage failed first)."""


class P2PCommunicator:
    """Sends and receives of one fixed activation shape for one pipeline stage."""

    def __init__(self, pstate: Optional[ParallelState] = None, tensor_shape: Sequence[int] = (),
                 dtype: torch.dtype = torch.float32):
        self.pstate = require_state(pstate)
        self.tensor_shape = tuple(int(s) for s in tensor_shape)
        self.dtype = dtype
        # NCCL needs its p2p calls grouped; gloo's batch_isend_irecv is the same isend/irecv loop.
        self.batched = self.pstate.backend == "nccl"
        # Wall time spent posting and waiting: transfer plus idling on a neighbour (the bubble).
        self.seconds_blocked = 0.0
        self.synchronize_after_wait = False  # see ScheduleStats.time_transfers

    # ---- the one primitive ------------------------------------------------------------------
    def communicate(self, tensor_send_next: Optional[torch.Tensor], tensor_send_prev: Optional[torch.Tensor],
                    recv_prev: bool, recv_next: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send to / receive from both neighbours at once; returns (from_prev, from_next)."""
        ps = self.pstate
        if ps.pp_size == 1:
            return None, None
        device = ps.device
        recv_from_prev = self._empty(device) if recv_prev else None
        recv_from_next = self._empty(device) if recv_next else None
        # (op, tensor, peer, tag, what). Posted activation-first, then gradient, on every rank: with
        # two stages both directions go to the same peer, and NCCL (which ignores tags) pairs a
        # peer's sends and receives in posting order, so that order must agree on both sides.
        ops = []
        if tensor_send_next is not None:
            ops.append((dist.isend, self._check(tensor_send_next, "activation"), ps.pp_next_rank, FORWARD_TAG,
                        "send activation to next stage"))
        if recv_from_prev is not None:
            ops.append((dist.irecv, recv_from_prev, ps.pp_prev_rank, FORWARD_TAG,
                        "receive activation from previous stage"))
        if tensor_send_prev is not None:
            ops.append((dist.isend, self._check(tensor_send_prev, "gradient"), ps.pp_prev_rank, BACKWARD_TAG,
                        "send gradient to previous stage"))
        if recv_from_next is not None:
            ops.append((dist.irecv, recv_from_next, ps.pp_next_rank, BACKWARD_TAG,
                        "receive gradient from next stage"))
        if ops:
            self._run(ops)
        for t in (recv_from_prev, recv_from_next):
            if t is not None:
                t.requires_grad_(True)
        return recv_from_prev, recv_from_next

    def _empty(self, device) -> torch.Tensor:
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=device)

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.tensor_shape or t.dtype != self.dtype:
            raise P2PError(f"pipeline stage {self.pstate.pp_rank}: {what} to send has shape {tuple(t.shape)} "
                           f"{t.dtype}, but stages exchange {self.tensor_shape} {self.dtype} "
                           "(--seq-length, --micro-batch-size, --hidden-size; / TP with --sequence-parallel)")
        return t.detach().contiguous()

    def _run(self, ops) -> None:
        start = time.perf_counter()
        try:
            self._post_and_wait(ops)
            if self.synchronize_after_wait and self.pstate.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            self.seconds_blocked += time.perf_counter() - start

    def _post_and_wait(self, ops) -> None:
        group = self.pstate.pp_group
        try:
            if self.batched:
                reqs = dist.batch_isend_irecv([dist.P2POp(op, t, peer, group, tag) for op, t, peer, tag, _ in ops])
                whats = [w for *_, w in ops]
            else:
                reqs, whats = [], []
                for op, t, peer, tag, what in ops:
                    reqs.append(op(t, peer, group=group, tag=tag))
                    whats.append(what)
        except RuntimeError as e:
            raise self._error("post transfers", e) from e
        for req, what in zip(reqs, whats):
            try:
                req.wait()
            except RuntimeError as e:
                raise self._error(what, e) from e

    def _error(self, what: str, cause: Exception) -> P2PError:
        ps = self.pstate
        return P2PError(
            f"pipeline stage {ps.pp_rank} (rank {ps.rank}) could not {what} "
            f"(previous stage rank {ps.pp_prev_rank}, next stage rank {ps.pp_next_rank}): {cause}. "
            "A neighbouring stage has usually failed first (see its error); "
            "--distributed-timeout-minutes bounds how long a stage waits.")

    # ---- Megatron's named calls -------------------------------------------------------------
    # ``chunk``: the model chunk the schedule is running (interleaving); whether this rank holds the
    # first/last virtual stage depends on it. Plain schedules run chunk 0.
    def recv_forward(self, chunk: int = 0) -> Optional[torch.Tensor]:
        if self.pstate.is_pipeline_first_stage(chunk):
            return None
        return self.communicate(None, None, recv_prev=True, recv_next=False)[0]

    def recv_backward(self, chunk: int = 0) -> Optional[torch.Tensor]:
        if self.pstate.is_pipeline_last_stage(chunk):
            return None
        return self.communicate(None, None, recv_prev=False, recv_next=True)[1]

    def send_forward(self, output_tensor, chunk: int = 0) -> None:
        if not self.pstate.is_pipeline_last_stage(chunk):
            self.communicate(output_tensor, None, recv_prev=False, recv_next=False)

    def send_backward(self, input_tensor_grad, chunk: int = 0) -> None:
        if not self.pstate.is_pipeline_first_stage(chunk):
            self.communicate(None, input_tensor_grad, recv_prev=False, recv_next=False)

    def send_forward_recv_backward(self, output_tensor, chunk: int = 0) -> Optional[torch.Tensor]:
        if self.pstate.is_pipeline_last_stage(chunk):
            return None
        return self.communicate(output_tensor, None, recv_prev=False, recv_next=True)[1]

    def send_backward_recv_forward(self, input_tensor_grad, chunk: int = 0) -> Optional[torch.Tensor]:
        if self.pstate.is_pipeline_first_stage(chunk):
            return None
        return self.communicate(None, input_tensor_grad, recv_prev=True, recv_next=False)[0]

    # The interleaved schedule decides per call what to send/receive (chunks wrap around the ring),
    # so these take explicit flags and send whatever tensors are not None.
    def send_forward_recv_forward(self, output_tensor, recv_prev: bool) -> Optional[torch.Tensor]:
        return self.communicate(output_tensor, None, recv_prev=recv_prev, recv_next=False)[0]

    def send_backward_recv_backward(self, input_tensor_grad, recv_next: bool) -> Optional[torch.Tensor]:
        return self.communicate(None, input_tensor_grad, recv_prev=False, recv_next=recv_next)[1]

    def send_forward_backward_recv_forward_backward(self, output_tensor, input_tensor_grad, recv_prev: bool,
                                                    recv_next: bool):
        return self.communicate(output_tensor, input_tensor_grad, recv_prev=recv_prev, recv_next=recv_next)
