"""Rotary position embeddings (RoFormer), in Megatron-LM's non-interleaved layout.

The head dim is split in two halves that rotate as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
with frequency ``base ** (-2i / d)`` for pair i. Angles come from ``position_ids`` so that
``--reset-position-ids`` restarts the rotation at each document (Megatron uses 0..s-1 always; the
two agree whenever positions are not reset).
"""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim, got {dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        # Not persistent: derived from the config, so it stays out of checkpoints.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [b, s] -> angles [s, b, 1, dim] (fp32), broadcast over heads."""
        angles = position_ids.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)  # [b, s, dim]: both halves share a frequency
        return angles.transpose(0, 1).unsqueeze(2).contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate t [s, b, heads, dim] by angles [s, b, 1, dim]; computed in fp32, returned in t's dtype."""
    cos, sin = angles.cos(), angles.sin()
    tf = t.float()
    return (tf * cos + _rotate_half(tf) * sin).to(t.dtype)
