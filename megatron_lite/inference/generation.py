"""Scoring and greedy sampling through the pipeline schedule, so any TP x PP layout runs them.

Every call runs one forward-only micro-batch of a fixed [1, seq_length] shape (the shape the
stages exchange); a prompt is right-padded, which the causal mask makes harmless for the
positions that are read. The last stage computes the result and broadcasts it to the stage's
pipeline peers, so every rank returns the same value.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_lite.inference.loading import InferenceModel
from megatron_lite.parallel.mappings import gather_from_tp


def _run_forward(model: InferenceModel, batch: dict, non_loss_func) -> list:
    from megatron_lite.parallel.schedules import get_forward_backward_func

    cfg, ps = model.cfg, model.pstate

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b.get("labels"))

        def loss_func(output, non_loss_data=False):
            return non_loss_func(output)
        return out, loss_func

    iters = [iter([batch]) for _ in model.chunks]
    return get_forward_backward_func(cfg)(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=model.chunks, num_microbatches=1, seq_length=cfg.model.seq_length, micro_batch_size=1,
        hidden_size=cfg.model.hidden_size, pstate=ps, forward_only=True, dtype=cfg.model.params_dtype,
        sequence_parallel=cfg.model.sequence_parallel, collect_non_loss_data=True)


def _from_last_stage(model: InferenceModel, value: torch.Tensor) -> torch.Tensor:
    """``value`` as computed on the last pipeline stage, on every rank of the pipeline."""
    ps = model.pstate
    if ps.pp_size > 1:
        dist.broadcast(value, src=ps.pp_ranks[-1], group=ps.pp_group)
    return value


@torch.no_grad()
def next_token(model: InferenceModel, ids: List[int], vocab_size: int) -> int:
    """The most likely token after ``ids`` (the last seq_length of them)."""
    seq, dev = model.cfg.model.seq_length, model.pstate.device
    ctx = ids[-seq:]
    tokens = torch.zeros(1, seq, dtype=torch.long, device=dev)
    tokens[0, :len(ctx)] = torch.tensor(ctx, dtype=torch.long, device=dev)
    batch = {"tokens": tokens, "position_ids": torch.arange(seq, device=dev).unsqueeze(0)}

    def pick(logits):  # [1, s, V/tp] vocab-parallel
        last = gather_from_tp(logits[:, len(ctx) - 1, :].contiguous().float(), model.pstate)
        last[..., vocab_size:] = float("-inf")  # padded vocabulary entries are never real tokens
        return last.argmax(-1)

    out = _run_forward(model, batch, pick)
    value = out[0].reshape(1).long() if out else torch.zeros(1, dtype=torch.long, device=dev)
    return int(_from_last_stage(model, value).item())


@torch.no_grad()
def full_logits(model: InferenceModel, ids: List[int]) -> torch.Tensor:
    """fp32 logits [len(ids), padded vocabulary] after each position, the same on every rank
    (``len(ids) <= seq_length``; checkpoint-conversion parity compares them with HuggingFace's)."""
    seq, dev = model.cfg.model.seq_length, model.pstate.device
    n = len(ids)
    if not 0 < n <= seq:
        raise ValueError(f"full_logits: need 1..{seq} tokens, got {n}")
    tokens = torch.zeros(1, seq, dtype=torch.long, device=dev)
    tokens[0, :n] = torch.tensor(ids, dtype=torch.long, device=dev)
    batch = {"tokens": tokens, "position_ids": torch.arange(seq, device=dev).unsqueeze(0)}
    out = _run_forward(model, batch, lambda logits: gather_from_tp(logits[0, :n].contiguous().float(), model.pstate))
    value = out[0] if out else torch.zeros(n, model.cfg.model.padded_vocab_size, device=dev)
    return _from_last_stage(model, value.contiguous())


def greedy(model: InferenceModel, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.tokenize(prompt)
    out: List[int] = []
    for _ in range(max_new_tokens):
        nxt = next_token(model, ids + out, tokenizer.vocab_size)
        if nxt == tokenizer.eod:
            break
        out.append(nxt)
    return tokenizer.detokenize(out)


@torch.no_grad()
def masked_loss_sum(model: InferenceModel, batch: dict) -> torch.Tensor:
    """[sum of per-token losses where loss_mask, number of such tokens] for one [1, s] batch."""
    mask = batch["loss_mask"]

    def score(losses):
        return torch.stack([(losses.float() * mask).sum(), mask.sum().float()])

    out = _run_forward(model, batch, score)
    value = out[0] if out else torch.zeros(2, device=model.pstate.device)
    return _from_last_stage(model, value)


def evaluate_loss(model: InferenceModel, dataset, num_samples: int, eod: int) -> float:
    """Mean per-token loss over the first ``num_samples`` samples of ``dataset``."""
    from megatron_lite.training.batch import samples_to_batch

    total = torch.zeros(2, device=model.pstate.device)
    for i in range(num_samples):
        texts = torch.from_numpy(dataset[i]["text"]).long().unsqueeze(0)
        batch = samples_to_batch(texts, eod, model.cfg.model, model.pstate.device)
        total += masked_loss_sum(model, batch)
    return float(total[0] / total[1].clamp(min=1.0))
