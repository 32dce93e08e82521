"""softmax(scale * x + mask) over the last dimension: the single dispatch point for attention softmax.

The torch path below is the reference semantics. (The Triton kernel plugs in here.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """Bool [sq, sk], True where a query may NOT attend (strictly upper triangle)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1 + sk - sq)


def scale_mask_softmax_reference(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                                 causal: bool, softmax_in_fp32: bool = True) -> torch.Tensor:
    """x: [b, np, sq, sk]; mask: bool broadcastable to x, True = masked out. Returns x's dtype.

    Fully masked rows give zeros (not NaN), as the fused kernel does.
    """
    orig = x.dtype
    if softmax_in_fp32:
        x = x.float()
    x = x * scale
    full = None
    if causal:
        full = causal_mask(x.shape[-2], x.shape[-1], x.device)
    if mask is not None:
        full = mask if full is None else (full | mask)
    if full is not None:
        x = x.masked_fill(full, float("-inf"))
    y = torch.softmax(x, dim=-1)
    if full is not None:
        y = torch.nan_to_num(y, nan=0.0)  # a row with every key masked: zeros, as Megatron's kernel
    return y.to(orig)


class FusedScaleMaskSoftmax(nn.Module):
    """Megatron-LM's FusedScaleMaskSoftmax: probs = softmax(scale * scores + mask).

    causal: apply the upper-triangular mask (then ``mask`` may be None).
    masked_softmax_fusion: allow the fused kernel when the device and shapes fit.
    """

    def __init__(self, causal: bool, scale: Optional[float] = None, masked_softmax_fusion: bool = True,
                 softmax_in_fp32: bool = True):
        super().__init__()
        self.causal = causal
        self.scale = 1.0 if scale is None else float(scale)
        self.masked_softmax_fusion = masked_softmax_fusion
        self.softmax_in_fp32 = softmax_in_fp32

    def forward(self, scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return scale_mask_softmax_reference(scores, mask, self.scale, self.causal, self.softmax_in_fp32)
