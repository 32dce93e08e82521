"""Batched text generation with a KV cache under any TP x PP layout, and the scoring helpers that
evaluation and checkpoint conversion use.

    results = generate(model, [ids_a, ids_b], max_new_tokens=32, sampling=SamplingParams(top_k=1), eod=eod)
    results[0].tokens, results[0].generated, results[0].logprobs

Prompts of different lengths are right-padded (Megatron-LM's scheme): the prompt of the shortest
row is prefilled in one forward, then every step feeds one position per row; a row whose prompt
still has a token at that position takes it instead of the sampled one. So no row ever attends to
padding and positions are 0..n-1 in every row: no padding mask, and RoPE and learned positions
work unchanged. ``use_cache=False`` recomputes the whole prefix at each step (the reference the
cache is tested against).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lite.inference.forward import forward_through_stages, gathered_logits
from megatron_lite.inference.kv_cache import KVCache
from megatron_lite.inference.loading import InferenceModel
from megatron_lite.inference.sampling import GREEDY, SamplingParams, sample


@dataclass
class Generation:
    prompt_length: int
    tokens: List[int]                       # prompt + generated (an ending <|endoftext|> included)
    logprobs: List[float] = field(default_factory=list)  # log p(token) of each generated token
    stopped_at_eod: bool = False

    @property
    def generated(self) -> List[int]:
        return self.tokens[self.prompt_length:]

    def continuation(self, tokenizer) -> str:
        """The generated text, without the end-of-text token."""
        return tokenizer.detokenize([t for t in self.generated if t != tokenizer.eod])


def max_sequence_length(model: InferenceModel) -> int:
    """Positions the model can hold: --max-position-embeddings with learned positions, else --seq-length."""
    m = model.cfg.model
    if m.position_embedding_type == "learned_absolute":
        return m.max_position_embeddings or m.seq_length
    return max(m.seq_length, m.max_position_embeddings or 0)


def check_prompts(model: InferenceModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """ValueError naming what is wrong: no prompts, an empty one, or prompt + new tokens beyond the model."""
    limit = max_sequence_length(model)
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 0:
        raise ValueError(f"tokens to generate must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that is "
                             f"{len(p) + max_new_tokens}, beyond the model's {limit} positions")


def _agreed_seed(model: InferenceModel, seed: Optional[int]) -> int:
    """The request's seed, or one drawn by global rank 0 and shared, so all ranks sample alike."""
    if seed is not None:
        return int(seed)
    value = torch.randint(0, 2 ** 62, (1,), dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(value, src=0)
    return int(value.item())


@torch.no_grad()
def generate(model: InferenceModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams = GREEDY, eod: Optional[int] = None, use_cache: bool = True) -> List[Generation]:
    """Generate up to ``max_new_tokens`` after each prompt (token ids), stopping a row at ``eod``.
    Every rank returns the same list."""
    check_prompts(model, prompts, max_new_tokens)
    ps, m = model.pstate, model.cfg.model
    dev, vocab = ps.device, m.vocab_size or m.padded_vocab_size
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
    ends = lengths + max_new_tokens            # exclusive end of each row
    total = int(ends.max())
    tokens = torch.full((b, total), eod if eod is not None else 0, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long, device=dev)
    logprobs = torch.zeros(b, total, dtype=torch.float32, device=dev)
    finished = lengths >= ends                  # max_new_tokens == 0
    eod_hit = torch.zeros(b, dtype=torch.bool, device=dev)
    generator = None if sampling.greedy else torch.Generator().manual_seed(_agreed_seed(model, sampling.seed))
    cache = KVCache(b, total) if use_cache else None
    done_up_to = 0
    for cur in range(int(lengths.min()), total):
        if bool(finished.all()):
            break
        start = done_up_to if use_cache else 0
        positions = torch.arange(start, cur, device=dev).unsqueeze(0).expand(b, -1)
        in_prompt = cur < lengths

        def choose(logits):  # [b, n, V/tp] on the last stage -> [2, b]: next ids, their log-probs
            last = gathered_logits(logits[:, -1, :], ps, vocab)
            picked = sample(last, sampling, generator)
            picked = torch.where(in_prompt, tokens[:, cur], picked)
            lp = torch.log_softmax(last, dim=-1).gather(1, picked.unsqueeze(1)).squeeze(1)
            return torch.stack([picked.double(), lp.double()])

        out = forward_through_stages(model, tokens[:, start:cur], positions, choose, (2, b), torch.float64,
                                     kv_cache=cache)
        if cache is not None:
            cache.advance(cur - start)
        done_up_to = cur
        new_ids, new_lp = out[0].long(), out[1].float()
        writing = ~finished & ~in_prompt
        tokens[:, cur] = torch.where(writing, new_ids, tokens[:, cur])
        logprobs[:, cur] = torch.where(writing, new_lp, logprobs[:, cur])
        if eod is not None:
            eod_hit |= writing & (new_ids == eod)
        finished |= eod_hit | (cur + 1 >= ends)
    results = []
    for i in range(b):
        n_prompt = int(lengths[i])
        row = tokens[i, :int(ends[i])].tolist()
        lp = logprobs[i, n_prompt:int(ends[i])].tolist()
        if eod is not None and eod in row[n_prompt:]:
            cut = row.index(eod, n_prompt) + 1
            row, lp = row[:cut], lp[:cut - n_prompt]
        results.append(Generation(n_prompt, row, lp, stopped_at_eod=bool(eod_hit[i])))
    return results


def generate_text(model: InferenceModel, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  sampling: SamplingParams = GREEDY, use_cache: bool = True) -> List[dict]:
    """Text in, text out: [{"prompt", "text" (the continuation, no <|endoftext|>), "tokens", "logprobs"}]."""
    ids = [tokenizer.tokenize(p) for p in prompts]
    out = []
    for prompt, g in zip(prompts, generate(model, ids, max_new_tokens, sampling, tokenizer.eod, use_cache)):
        out.append({"prompt": prompt, "text": g.continuation(tokenizer), "tokens": g.tokens,
                    "logprobs": g.logprobs, "stopped_at_eod": g.stopped_at_eod})
    return out


# ---- scoring ----------------------------------------------------------------------------------

@torch.no_grad()
def full_logits(model: InferenceModel, ids: List[int]) -> torch.Tensor:
    """fp32 logits [len(ids), padded vocabulary] after each position, the same on every rank
    (checkpoint-conversion parity compares them with HuggingFace's)."""
    n, dev = len(ids), model.pstate.device
    if not 0 < n <= max_sequence_length(model):
        raise ValueError(f"full_logits: need 1..{max_sequence_length(model)} tokens, got {n}")
    tokens = torch.tensor([ids], dtype=torch.long, device=dev)
    positions = torch.arange(n, device=dev).unsqueeze(0)
    vocab = model.cfg.model.padded_vocab_size
    return forward_through_stages(model, tokens, positions,
                                  lambda logits: gathered_logits(logits[0], model.pstate, vocab),
                                  (n, vocab))


@torch.no_grad()
def token_losses(model: InferenceModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, n] of ``labels`` after ``tokens`` (positions 0..n-1), every rank."""
    b, n = tokens.shape
    positions = torch.arange(n, device=tokens.device).unsqueeze(0).expand(b, -1)
    return forward_through_stages(model, tokens, positions, lambda loss: loss.float(), (b, n), labels=labels)


def evaluate_loss(model: InferenceModel, dataset, num_samples: int, eod: int) -> float:
    """Mean per-token loss over the first ``num_samples`` samples of ``dataset``, with the loss mask
    and attention mask the trainer's validation uses (--eod-mask-loss, --reset-attention-mask)."""
    from megatron_lite.training.batch import samples_to_batch

    m, dev = model.cfg.model, model.pstate.device
    step = model.cfg.train.micro_batch_size  # samples per forward, as the trainer's validation
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(0, num_samples, step):
        texts = torch.stack([torch.from_numpy(dataset[i]["text"]).long()
                             for i in range(start, min(start + step, num_samples))])
        batch = samples_to_batch(texts, eod, m, dev)
        mask = batch["loss_mask"]
        losses = forward_through_stages(model, batch["tokens"], batch["position_ids"], lambda x: x.float(),
                                        tuple(mask.shape), attention_mask=batch["attention_mask"],
                                        labels=batch["labels"])
        total += torch.stack([(losses * mask).sum(), mask.sum()]).double().cpu()
    return float(total[0] / total[1].clamp(min=1.0))
