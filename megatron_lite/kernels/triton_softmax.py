"""Triton kernels for y = softmax(scale * x + mask) over the last dim, and its backward.

Imported only by ``fused_softmax`` when the kernel path is taken: this module imports triton at
the top, so it must never be imported where triton may be absent.

Layout: x is a contiguous [b, np, sq, sk] tensor seen as b*np*sq rows of sk; one program per row.
Masks, both optional and combined:
  - causal (Megatron's scaled_upper_triang_masked_softmax): query i attends keys k <= i + (sk - sq);
  - explicit bool mask (True = masked) broadcast to [b, np, sq, sk] through its strides (stride 0
    on broadcast dims), so a [b, 1, sq, sk] padding mask is never materialized per head.
Arithmetic is fp32 whatever the input dtype; y is written in x's dtype. A row with every key
masked gives zeros, as Megatron's CUDA kernel does (no NaN).

Rows up to BLOCK columns are held in registers (one read, one write). Longer rows loop over
column blocks: an online max/sum pass, then a normalize-and-write pass (two reads, one write).
Causally masked columns are never loaded (masked loads do not touch memory), which saves about
half the reads of a causal score matrix.

Backward needs only the saved y: dx = scale * y * (dy - sum(dy * y)). Masked positions have
y == 0, so they get dx == 0 without the mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

DEFAULT_MAX_BLOCK = 4096  # columns held in registers per row; longer rows take the looped path


@triton.jit
def _row_setup(row, sq, sk, n_heads, CAUSAL: tl.constexpr):
    """(b, h, q) indices of this row and the number of keys it may attend (leading columns)."""
    q = row % sq
    bh = row // sq
    h = bh % n_heads
    b = bh // n_heads
    if CAUSAL:
        n_keys = tl.minimum(tl.maximum(q + sk - sq + 1, 0), sk)
    else:
        n_keys = sk + 0 * q  # same integer type as the causal branch
    return b, h, q, n_keys


@triton.jit
def _load_scaled(x_row, m_row, m_sk, cols, n_keys, scale, HAS_MASK: tl.constexpr):
    """scale * x for attendable columns, -inf elsewhere (masked columns are not read)."""
    keep = cols < n_keys
    if HAS_MASK:
        masked = tl.load(m_row + cols * m_sk, mask=keep, other=1)
        keep = keep & (masked == 0)
    x = tl.load(x_row + cols, mask=keep, other=0.0).to(tl.float32)
    return tl.where(keep, x * scale, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, mask_ptr, scale, sq, sk, n_heads,
                        m_sb, m_sh, m_sq, m_sk,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                        BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: b*np*sq*sk passes 2**31 at long sequences
    b, h, q, n_keys = _row_setup(row, sq, sk, n_heads, CAUSAL)
    x_row = x_ptr + row * sk
    y_row = y_ptr + row * sk
    m_row = mask_ptr
    if HAS_MASK:
        m_row = mask_ptr + b * m_sb + h * m_sh + q * m_sq
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        z = _load_scaled(x_row, m_row, m_sk, cols, n_keys, scale, HAS_MASK)
        row_max = tl.max(z, axis=0)
        # A fully masked row has max -inf; shifting by 0 instead keeps exp(-inf) = 0, not NaN.
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        e = tl.exp(z - shift)
        denom = tl.sum(e, axis=0)
        inv = tl.where(denom > 0.0, 1.0 / tl.maximum(denom, 1e-30), 0.0)
        tl.store(y_row + cols, (e * inv).to(y_ptr.dtype.element_ty), mask=cols < sk)
    else:
        # Pass 1: online max and normalizer over the attendable prefix only.
        m = float("-inf")
        d = 0.0
        for start in range(0, n_keys, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = _load_scaled(x_row, m_row, m_sk, cols, n_keys, scale, HAS_MASK)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        shift = tl.where(m == float("-inf"), 0.0, m)
        inv = tl.where(d > 0.0, 1.0 / tl.maximum(d, 1e-30), 0.0)
        # Pass 2: normalize and write every column (zeros past the causal limit, unread).
        for start in range(0, sk, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = _load_scaled(x_row, m_row, m_sk, cols, n_keys, scale, HAS_MASK)
            y = tl.exp(z - shift) * inv
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < sk)


@triton.jit
def _softmax_bwd_kernel(dy_ptr, y_ptr, dx_ptr, scale, sq, sk, n_heads,
                        CAUSAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b, h, q, n_keys = _row_setup(row, sq, sk, n_heads, CAUSAL)
    dy_row = dy_ptr + row * sk
    y_row = y_ptr + row * sk
    dx_row = dx_ptr + row * sk
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        keep = cols < n_keys
        y = tl.load(y_row + cols, mask=keep, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=keep, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=0)
        dx = scale * y * (dy - dot)
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < sk)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_keys, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep = cols < n_keys
            y = tl.load(y_row + cols, mask=keep, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=keep, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, sk, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep = cols < n_keys
            y = tl.load(y_row + cols, mask=keep, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=keep, other=0.0).to(tl.float32)
            dx = scale * y * (dy - dot)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < sk)


def _launch_params(sk: int, max_block: Optional[int]):
    """(BLOCK, SINGLE, num_warps): whole row in registers when it fits, else a column loop."""
    max_block = DEFAULT_MAX_BLOCK if max_block is None else int(max_block)
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a power of two >= 1, got {max_block}")
    block = min(triton.next_power_of_2(sk), max_block)
    num_warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
    return block, sk <= block, num_warps


def _check_x(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [b, np, sq, sk], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be fp16, bf16 or fp32, got {x.dtype}")
    return x.contiguous()


def softmax_forward(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool,
                    max_block: Optional[int] = None) -> torch.Tensor:
    x = _check_x(x, "scores")
    b, n_heads, sq, sk = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = masked), got {mask.dtype}")
        try:
            mask = mask.expand(x.shape)  # broadcast dims get stride 0: read once per row, never copied
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to scores "
                             f"{tuple(x.shape)}; expected [b or 1, np or 1, sq, sk]") from None
        mask_u8 = mask.view(torch.uint8)
        strides = mask_u8.stride()
    else:
        mask_u8, strides = x, (0, 0, 0, 0)  # unused pointer; HAS_MASK=False compiles the loads out
    block, single, num_warps = _launch_params(sk, max_block)
    _softmax_fwd_kernel[(b * n_heads * sq,)](
        x, y, mask_u8, float(scale), sq, sk, n_heads, *strides,
        HAS_MASK=mask is not None, CAUSAL=bool(causal), BLOCK=block, SINGLE=single, num_warps=num_warps)
    return y


def softmax_backward(dy: torch.Tensor, y: torch.Tensor, scale: float, causal: bool,
                     max_block: Optional[int] = None) -> torch.Tensor:
    dy = _check_x(dy, "grad").to(y.dtype)
    b, n_heads, sq, sk = y.shape
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    block, single, num_warps = _launch_params(sk, max_block)
    _softmax_bwd_kernel[(b * n_heads * sq,)](
        dy, y, dx, float(scale), sq, sk, n_heads,
        CAUSAL=bool(causal), BLOCK=block, SINGLE=single, num_warps=num_warps)
    return dx
