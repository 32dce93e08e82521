"""softmax(scale * x + mask) over the last dimension: the single dispatch point for attention softmax.

Two paths with identical semantics:
  - ``scale_mask_softmax_reference``: plain torch, any device and dtype;
  - ``fused_scale_mask_softmax``: the Triton kernel (``triton_softmax``), forward and backward,
    as one autograd op. It reads scores once and writes probabilities once, instead of the
    reference's separate scale, masked_fill, softmax and cast passes.
``FusedScaleMaskSoftmax`` picks between them as Megatron-LM's does (deviations below): whether the kernel can run
at all (fusion enabled, CUDA present, triton importable) is decided once, at construction; each
call then checks only the tensor (CUDA, dtype, shape). triton is imported lazily, so this module
imports and works where triton is absent.

Where the dispatch and semantics deviate from Megatron-LM's FusedScaleMaskSoftmax
(``is_kernel_available`` and its CUDA kernels ``scaled_upper_triang_masked_softmax`` /
``scaled_masked_softmax``):
  - dtype: fp32 scores are fused too; Megatron fuses only fp16/bf16 input and sends fp32 to torch.
    Both compute in fp32 inside the kernel, so ``softmax_in_fp32`` matters only on the torch path,
    and any ``scale`` is allowed here (Megatron asserts ``softmax_in_fp32`` when a scale is set).
  - sk limits: 1 <= sk <= MAX_FUSED_SEQ (16384, the longest row Megatron's CUDA kernel accepts),
    and sq > 1 (sq == 1 is decoding); Megatron's dispatch takes only 16 < sk <= 4096.
  - shape divisibility: none. Megatron's warp-per-row CUDA kernel needs sq % 4 == 0, sk % 4 == 0,
    b * np % 4 == 0 and rows divisible by its batch-per-block in the dispatch (and sk % 8 == 0 at
    the kernel's entry); the Triton kernel handles any row length (masked loads, and a multi-block
    loop past ``max_block``) and any number of rows.
  - causal: the triangle is anchored at the bottom right (``causal_mask``), so sk >= sq works;
    Megatron's causal kernel requires sq == sk. A bool mask may broadcast over any of b, np, sq, sk
    (Megatron's padding kernel takes [b|1, 1, sq, sk]) and may be combined with the causal mask.
  - masking: masked scores become -inf, so a masked key gets exactly 0 and a row with every key
    masked gives zeros. Megatron fills masked scores with -10000.0 (``attention_mask_func`` on the
    torch path, and its padding kernel), which gives a fully masked row uniform weights 1/sk and a
    masked key a nonzero weight when the unmasked scores are themselves near -10000.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
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
        # A row with every key masked gives zeros, as the Triton kernel does (Megatron's -10000 fill
        # would give a uniform row instead).
        y = torch.nan_to_num(y, nan=0.0)
    return y.to(orig)


MAX_FUSED_SEQ = 16384  # longest key dimension the kernel path takes (Megatron's limit)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when triton can be imported (checked once per process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # a broken install must mean "no kernel", not a crash at model build
        return False
    return True


def kernel_available() -> bool:
    """Whether the Triton path can run on this machine: CUDA present and triton importable."""
    return torch.cuda.is_available() and triton_importable()


def kernel_fits(shape, dtype: torch.dtype, mask_shape=None, mask_dtype=None) -> bool:
    """Shape and dtype rules of the kernel path (device aside): [b, np, sq, sk] with 1 < sq and
    sk <= MAX_FUSED_SEQ, fp16/bf16/fp32, and a bool mask broadcastable as [b|1, np|1, sq|1, sk|1]."""
    if len(shape) != 4 or dtype not in FUSED_DTYPES:
        return False
    sq, sk = shape[-2:]
    # sq == 1 is incremental decoding: one short row per head, nothing worth a kernel launch.
    if sq <= 1 or sk < 1 or sk > MAX_FUSED_SEQ:
        return False
    if mask_shape is not None:
        if mask_dtype != torch.bool or len(mask_shape) > 4:
            return False
        mask_shape = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
        if any(m not in (1, s) for m, s in zip(mask_shape, shape)):
            return False
    return True


class _FusedScaleMaskSoftmaxFn(torch.autograd.Function):
    """Triton forward and backward; saves only the output y (backward needs nothing else)."""

    @staticmethod
    def forward(ctx, x, mask, scale, causal, max_block):
        from megatron_lite.kernels import triton_softmax
        y = triton_softmax.softmax_forward(x, mask, scale, causal, max_block)
        ctx.save_for_backward(y)
        ctx.scale, ctx.causal, ctx.max_block = scale, causal, max_block
        return y

    @staticmethod
    def backward(ctx, dy):
        from megatron_lite.kernels import triton_softmax
        (y,) = ctx.saved_tensors
        dx = triton_softmax.softmax_backward(dy, y, ctx.scale, ctx.causal, ctx.max_block)
        return dx, None, None, None, None


def fused_scale_mask_softmax(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool,
                             max_block: Optional[int] = None) -> torch.Tensor:
    """The Triton path, taken unconditionally (no dispatch rules): x [b, np, sq, sk] fp16/bf16/fp32,
    mask bool broadcastable to x (True = masked) or None. Returns x's dtype, differentiable in x.

    CPU tensors need TRITON_INTERPRET=1 in the environment before triton is first imported
    (the tests do this). ``max_block`` caps the columns held per row (a power of two); rows longer
    than it take the multi-block loop, which tests force with a small value.
    """
    if not triton_importable():
        raise RuntimeError("fused_scale_mask_softmax needs triton; install it or use "
                           "scale_mask_softmax_reference")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the Triton softmax kernel needs a CUDA tensor; on CPU set TRITON_INTERPRET=1 "
                           "before importing triton, or use scale_mask_softmax_reference")
    if mask is not None and mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but scores are on {x.device}")
    return _FusedScaleMaskSoftmaxFn.apply(x, mask, float(scale), bool(causal), max_block)


class FusedScaleMaskSoftmax(nn.Module):
    """Megatron-LM's FusedScaleMaskSoftmax: probs = softmax(scale * scores + mask).

    causal: apply the upper-triangular mask (then ``mask`` may be None).
    masked_softmax_fusion: allow the fused kernel when the device and shapes fit.
    softmax_in_fp32: for the torch path, compute in fp32 (the kernel always does).
    """

    def __init__(self, causal: bool, scale: Optional[float] = None, masked_softmax_fusion: bool = True,
                 softmax_in_fp32: bool = True):
        super().__init__()
        self.causal = causal
        self.scale = 1.0 if scale is None else float(scale)
        self.masked_softmax_fusion = masked_softmax_fusion
        self.softmax_in_fp32 = softmax_in_fp32
        # Decided once: the per-call check below looks only at the tensor.
        self.kernel_available = bool(masked_softmax_fusion) and kernel_available()

    def uses_kernel(self, scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
        """Whether forward(scores, mask) takes the Triton path."""
        return (self.kernel_available and scores.is_cuda and (mask is None or mask.device == scores.device)
                and kernel_fits(tuple(scores.shape), scores.dtype,
                                None if mask is None else tuple(mask.shape),
                                None if mask is None else mask.dtype))

    def forward(self, scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.uses_kernel(scores, mask):
            return fused_scale_mask_softmax(scores, mask, self.scale, self.causal)
        return scale_mask_softmax_reference(scores, mask, self.scale, self.causal, self.softmax_in_fp32)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, scale={self.scale}, masked_softmax_fusion={self.masked_softmax_fusion}, "
                f"kernel_available={self.kernel_available}")
