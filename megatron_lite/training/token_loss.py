"""Per-token loss over the global batch (Megatron-LM's ``--calculate-per-token-loss``).

By default a task's ``loss_func`` returns each micro-batch's mean loss and the schedule averages
those means, so a micro-batch with few loss tokens (SFT: short responses) weighs as much as one
with many, and the result depends on how the global batch is cut into micro-batches and DP
replicas. With the flag, ``loss_func`` returns the micro-batch's *sum* of token losses and reports
``{"lm loss": sum, "num_tokens": n}``; after the gradient reduction the trainer rescales the
gradients so they are those of sum(token losses) / sum(loss tokens) over the whole global batch,
on every rank, whatever the micro-batch size and DP size.

Why the gradients are rescaled afterwards instead of dividing the loss first: under a pipeline the
last stage starts the backward of its first micro-batch before it has seen the later ones, so the
global token count is only known once the schedule is done.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

NUM_TOKENS = "num_tokens"


def token_sum_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """(sum of the masked per-token losses, the report ``{"lm loss": sum, "num_tokens": n}``)."""
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses * mask)
    return total, {"lm loss": total.detach(), NUM_TOKENS: mask.sum().detach()}


def _local_sums(loss_dicts: List[dict], device) -> torch.Tensor:
    """[sum of reported losses, sum of loss tokens] over this rank's micro-batches."""
    if any(NUM_TOKENS not in d for d in loss_dicts):
        raise ValueError("--calculate-per-token-loss: the task's loss_func must report "
                         f"{{'lm loss': sum, '{NUM_TOKENS}': count}} (see training/token_loss.py)")
    out = torch.zeros(2, dtype=torch.float64, device=device)
    for d in loss_dicts:
        out[0] += d["lm loss"].double()
        out[1] += torch.as_tensor(d[NUM_TOKENS]).double()
    return out


def global_loss_tokens(loss_dicts: List[dict], pstate) -> torch.Tensor:
    """The number of loss tokens in the whole global batch, on every rank (float64 [1]).

    Only the last pipeline stage ran loss_func: it broadcasts its count along the pipeline,
    then the data-parallel replicas sum theirs."""
    count = torch.zeros(1, dtype=torch.float64, device=pstate.device)
    if pstate.is_pipeline_last_stage():
        count += _local_sums(loss_dicts, pstate.device)[1]
    if pstate.pp_size > 1:
        dist.broadcast(count, src=pstate.pp_ranks[-1], group=pstate.pp_group)
    if pstate.dp_size > 1:
        dist.all_reduce(count, group=pstate.dp_group)
    return count


def scale_to_token_mean(model_chunks, loss_dicts: List[dict], num_microbatches: int, pstate) -> float:
    """Turn reduced gradients of mean-over-(micro-batches x DP) of loss sums into the gradient of
    the global per-token mean; returns the global loss-token count."""
    tokens = float(global_loss_tokens(loss_dicts, pstate).item())
    # The schedule divided each sum by num_microbatches and the DP reduction averaged over dp_size.
    factor = num_microbatches * pstate.dp_size / max(tokens, 1.0)
    for chunk in model_chunks:
        for buf in chunk.grad_buffers:
            buf.grad_data.mul_(factor)
    return tokens


def token_loss_sums(loss_dicts: List[dict], pstate) -> Optional[torch.Tensor]:
    """[sum of token losses, number of loss tokens] over the global batch (float64); None off the
    last stage. Evaluation adds these over its iterations and divides once, as Megatron-LM does."""
    if not pstate.is_pipeline_last_stage():
        return None
    sums = _local_sums(loss_dicts, pstate.device)
    if pstate.dp_size > 1:
        dist.all_reduce(sums, group=pstate.dp_group)
    return sums


def token_mean(sums: Optional[torch.Tensor]) -> Optional[float]:
    return None if sums is None else float(sums[0] / sums[1].clamp(min=1.0))


def reduce_token_loss(loss_dicts: List[dict], pstate) -> Optional[float]:
    """Sum of token losses / number of loss tokens over the global batch; None off the last stage."""
    return token_mean(token_loss_sums(loss_dicts, pstate))
