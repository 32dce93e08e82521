"""Choosing the next token from fp32 logits [b, V]: greedy, temperature, top-k, top-p (Megatron-LM's
text-generation semantics: ``top_k == 1`` or ``temperature == 0`` is greedy, ``top_k == 0`` and
``top_p == 0`` sample from the whole distribution).

Draws come from a CPU ``torch.Generator`` seeded once per request, so a seed gives the same tokens
on any device and at any layout (every TP rank of the last stage draws the same numbers from
bit-identical gathered logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 1 and self.top_p > 0:
            raise ValueError("give top_k or top_p, not both")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


GREEDY = SamplingParams(top_k=1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), the rest -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the nucleus: the most probable tokens whose cumulative probability first reaches p (the
    most probable token is always kept), the rest -inf."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # A token is outside once the tokens before it already reach p.
    outside_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    outside = torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)
    return logits.masked_fill(outside, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids [b] from fp32 logits [b, V]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    scaled = top_k_filter(scaled, params.top_k)
    scaled = top_p_filter(scaled, params.top_p)
    probs = torch.softmax(scaled.float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
