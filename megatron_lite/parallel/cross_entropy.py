"""Cross entropy over vocabulary-parallel logits, without ever gathering the full logits.

Each TP rank holds logits[..., V/tp] for its contiguous slice of the vocabulary. Three
all-reduces over the TP group replace the gather (sizes are per token, not per vocab entry):
    max over the vocabulary (MAX)      -> numerically safe exp
    the target's logit (SUM)           -> only the rank owning the target contributes
    sum of exp (SUM)                   -> the softmax denominator
With label smoothing, the sum of the logits is all-reduced too, so the smoothed loss is
torch's definition: (1 - eps) * nll + eps * mean over the full vocabulary of -log p.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import ParallelState, require_state
from megatron_lite.parallel.utils import vocab_range_for_rank


def _all_reduce_(x: torch.Tensor, ps: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor this module created (never a caller's tensor)."""
    if ps.tp_size > 1:
        dist.all_reduce(x, op=op, group=ps.tp_group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing, ps):
        # fp32 working copy: subtracting the max out of place leaves the caller's logits untouched.
        logits = vocab_parallel_logits.float()
        logits_max = logits.max(dim=-1)[0]
        _all_reduce_(logits_max, ps, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)

        partition_vocab = logits.size(-1)
        global_vocab = partition_vocab * ps.tp_size
        start, end = vocab_range_for_rank(global_vocab, ps.tp_rank, ps.tp_size)
        target_outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(target_outside, 0).long()

        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill(target_outside, 0.0)
        _all_reduce_(predicted, ps)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce_(sum_exp, ps)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - predicted

        if label_smoothing > 0.0:
            sum_logits = logits.sum(dim=-1)
            _all_reduce_(sum_logits, ps)
            mean_neg_log_prob = log_sum_exp - sum_logits / global_vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_log_prob

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, target_outside, local_target)
        ctx.label_smoothing, ctx.global_vocab = label_smoothing, global_vocab
        ctx.input_dtype = vocab_parallel_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_outside, local_target = ctx.saved_tensors
        eps = ctx.label_smoothing
        # d loss / d logit_j = softmax_j - (1 - eps) * [j == target] - eps / V, on our shard only.
        grad = softmax.clone()
        if eps > 0.0:
            grad.sub_(eps / ctx.global_vocab)
        hit = (~target_outside).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0,
                                 pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Per-token loss [...] in fp32 from logits [..., V/tp] split over TP ranks and target [...].

    Equals ``F.cross_entropy(full_logits, target, reduction='none', label_smoothing=...)`` on the
    gathered logits. Targets index the full (padded) vocabulary.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target {tuple(target.shape)} "
                         "must agree on every dim but the last")
    ps = require_state(pstate)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, float(label_smoothing), ps)
