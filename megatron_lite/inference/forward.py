"""One forward pass of any shape through this rank's pipeline stages, for inference.

Training exchanges one fixed [seq, micro_batch, hidden] shape through the schedules; decoding needs
a prompt of n tokens, then one token per step, so this pass builds a communicator for the shape
of each call. The stages run their chunks in pipeline order (with virtual stages, chunk c of the
last rank feeds chunk c + 1 of the first), the last stage reduces the output to a small result
(the next tokens, their log-probabilities, per-token losses) and every rank of the pipeline
receives that result, so all ranks leave the call agreeing on what comes next.

Inference runs without sequence parallelism (loading.py turns it off: one new token cannot be
split over the TP ranks); the weights are the same either way.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lite.parallel.mappings import gather_from_tp
from megatron_lite.parallel.p2p import P2PCommunicator


@torch.no_grad()
def forward_through_stages(model, tokens: torch.Tensor, position_ids: torch.Tensor,
                           on_last_stage: Callable[[torch.Tensor], torch.Tensor], result_shape: Sequence[int],
                           result_dtype: torch.dtype = torch.float32, kv_cache=None,
                           attention_mask: Optional[torch.Tensor] = None,
                           labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run tokens/position_ids [b, n] through the model; return ``on_last_stage(output)`` on every rank.

    ``output`` is the last chunk's: vocab-parallel logits [b, n, V/tp], or the per-token loss [b, n]
    when ``labels`` are given. ``result_shape``/``result_dtype`` describe what ``on_last_stage``
    returns, so the other stages can receive it.
    """
    ps = model.pstate
    b, n = tokens.shape
    comm = P2PCommunicator(ps, (n, b, model.cfg.model.hidden_size), model.cfg.model.params_dtype)
    output = None
    for c, chunk in enumerate(model.chunks):
        received = comm.recv_forward(c)
        if received is not None:
            chunk.set_input_tensor(received)
        output = chunk(tokens, position_ids, attention_mask, labels=labels, kv_cache=kv_cache)
        comm.send_forward(output, c)
    if ps.is_pipeline_last_stage():
        result = on_last_stage(output).to(result_dtype).contiguous()
        if tuple(result.shape) != tuple(result_shape):
            raise ValueError(f"on_last_stage returned {tuple(result.shape)}, expected {tuple(result_shape)}")
    else:
        result = torch.empty(tuple(result_shape), dtype=result_dtype, device=ps.device)
    if ps.pp_size > 1:
        dist.broadcast(result, src=ps.pp_ranks[-1], group=ps.pp_group)
    return result


def gathered_logits(logits: torch.Tensor, pstate, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> fp32 [..., V_padded], the padded entries at -inf (they are
    never real tokens). Every TP rank gets the same tensor, bit for bit."""
    full = gather_from_tp(logits.float().contiguous(), pstate)
    full[..., vocab_size:] = float("-inf")
    return full
