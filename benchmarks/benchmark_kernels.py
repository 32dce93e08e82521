#!/usr/bin/env python3
"""GPU benchmark of the Triton scale-mask-softmax kernel against torch, as achieved memory bandwidth.

For each (batch x heads, sequence length) of the sweep, scores [1, bh, s, s] in --dtype:
  triton      fused_scale_mask_softmax: forward (read x, write y) and backward (read dy and y, write dx);
  torch       Megatron's unfused fallback (cast to fp32, scale, masked_fill, softmax, cast back) and
              the autograd backward of that graph;
  softmax     torch.softmax(x) alone, no scale or mask: torch's own fused kernel, a lower bound;
and the device's copy bandwidth measured in the same run (a 1 GiB device-to-device copy).
Bandwidth is nominal bytes / time: forward 2 x numel x itemsize (+ the padding mask once per query row
and key if --mask uses one), backward 3 x numel x itemsize, the same nominal bytes for every
implementation, so the columns compare times. (The causal kernel skips loading masked keys, so its
physical traffic is lower than nominal.) Times are medians of triton.testing.do_bench, which flushes
L2 before each run.

    python benchmarks/benchmark_kernels.py --output benchmarks/results/fused_softmax_h100.json
    python benchmarks/benchmark_kernels.py --bh 32 --seq 1024 4096 --mask padding --dtype fp16

Without a CUDA device it prints "no CUDA device: nothing measured", writes nothing and exits 0
(there is nothing wrong with the input). Without triton it exits 1 with a message.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_lite.cli import run_main
from megatron_lite.errors import UserError
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.kernels.fused_softmax import (fused_scale_mask_softmax, scale_mask_softmax_reference,
                                                 triton_importable)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Triton fused softmax vs torch: time and achieved bandwidth (GPU).")
    p.add_argument("--bh", type=int, nargs="+", default=[32, 64], help="batch x heads values")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                   help="sequence lengths (sq = sk)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--mask", choices=["causal", "padding", "none"], default="causal",
                   help="causal: upper-triangular; padding: a [1, 1, s, s] bool mask")
    p.add_argument("--scale", type=float, default=0.125)
    p.add_argument("--max-block", type=int, default=None,
                   help="kernel's per-row register block (power of two); longer rows loop")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--output", default=None, help="JSON file for the results (written atomically)")
    args = p.parse_args(argv)
    for name in ("bh", "seq"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    if any(s > 16384 for s in args.seq):
        p.error("--seq values must be <= 16384 (the kernel path's longest row)")
    if args.max_block is not None and (args.max_block < 1 or args.max_block & (args.max_block - 1)):
        p.error(f"--max-block must be a power of two, got {args.max_block}")
    return args


def bench_ms(fn, args, grad_to_none=None) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbs(args) -> float:
    """Device copy bandwidth: bytes read + written by a 1 GiB tensor copy, per second."""
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), args)
    gbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    return gbs


def measure(fn, nbytes, args, grad_to_none=None):
    """{'ms', 'gbs'} of one implementation, or {'error': 'OOM'} when it does not fit."""
    try:
        ms = bench_ms(fn, args, grad_to_none)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    return {"ms": ms, "gbs": nbytes / (ms * 1e-3) / 1e9}


def run_case(bh: int, s: int, args, copy_gbs: float) -> dict:
    dtype = DTYPES[args.dtype]
    causal = args.mask == "causal"
    mask = None
    if args.mask == "padding":  # the last quarter of the keys is padding, for every query
        mask = torch.zeros(1, 1, s, s, dtype=torch.bool, device="cuda")
        mask[..., s - s // 4:] = True
    x = torch.randn(1, bh, s, s, device="cuda", dtype=dtype)
    numel, item = x.numel(), x.element_size()
    fwd_bytes = 2 * numel * item + (mask.numel() if mask is not None else 0)
    bwd_bytes = 3 * numel * item
    row = {"bh": bh, "seq": s, "dtype": args.dtype, "mask": args.mask, "elements": numel}

    y = fused_scale_mask_softmax(x, mask, args.scale, causal, args.max_block)
    try:
        ref = scale_mask_softmax_reference(x, mask, args.scale, causal)
        row["max_abs_err_vs_torch"] = (y.float() - ref.float()).abs().max().item()
        del ref
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["max_abs_err_vs_torch"] = None
    row["fwd"] = {
        "triton": measure(lambda: fused_scale_mask_softmax(x, mask, args.scale, causal, args.max_block),
                          fwd_bytes, args),
        "torch": measure(lambda: scale_mask_softmax_reference(x, mask, args.scale, causal),
                         fwd_bytes, args),
        "softmax": measure(lambda: torch.softmax(x, dim=-1), fwd_bytes, args),
    }

    from megatron_lite.kernels import triton_softmax
    dy = torch.randn_like(y)
    row["bwd"] = {"triton": measure(
        lambda: triton_softmax.softmax_backward(dy, y, args.scale, causal, args.max_block), bwd_bytes, args)}
    y = None
    try:
        xr = x.detach().requires_grad_(True)
        yr = scale_mask_softmax_reference(xr, mask, args.scale, causal)
        row["bwd"]["torch"] = measure(
            lambda: torch.autograd.grad(yr, xr, dy, retain_graph=True), bwd_bytes, args)
        yr = None
        ys = torch.softmax(xr, dim=-1)
        row["bwd"]["softmax"] = measure(
            lambda: torch.autograd.grad(ys, xr, dy, retain_graph=True), bwd_bytes, args)
        ys = None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["bwd"].setdefault("torch", {"error": "OOM"})
        row["bwd"].setdefault("softmax", {"error": "OOM"})
    for d in ("fwd", "bwd"):
        t = row[d]["triton"]
        if "gbs" in t:
            t["pct_of_copy"] = 100.0 * t["gbs"] / copy_gbs
        if "ms" in t and "ms" in row[d]["torch"]:
            row[d]["speedup_vs_torch"] = row[d]["torch"]["ms"] / t["ms"]
    x = dy = None  # assigned rather than deleted: the lambdas above close over them
    torch.cuda.empty_cache()
    return row


def fmt(m: dict) -> str:
    return "OOM" if "error" in m else f"{m['ms']:8.3f} {m['gbs']:7.0f}"


def print_table(rows, copy_gbs):
    print(f"copy bandwidth (1 GiB device copy, read + write): {copy_gbs:.0f} GB/s")
    head = f"{'dir':3} {'bh':>4} {'seq':>5} | {'triton ms  GB/s':>16} {'%copy':>5} | {'torch ms  GB/s':>16} | " \
           f"{'softmax ms GB/s':>16} | {'x torch':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        for d in ("fwd", "bwd"):
            t = r[d]["triton"]
            pct = f"{t['pct_of_copy']:5.0f}" if "pct_of_copy" in t else "    -"
            sp = f"{r[d]['speedup_vs_torch']:7.2f}" if "speedup_vs_torch" in r[d] else "      -"
            print(f"{d:3} {r['bh']:4d} {r['seq']:5d} | {fmt(t):>16} {pct} | {fmt(r[d]['torch']):>16} | "
                  f"{fmt(r[d]['softmax']):>16} | {sp}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: run(args))


def run(args) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    if not triton_importable():
        raise UserError("triton is not installed; `pip install triton` to benchmark the kernel")
    copy_gbs = copy_bandwidth_gbs(args)
    rows = []
    for bh in args.bh:
        for s in args.seq:
            rows.append(run_case(bh, s, args, copy_gbs))
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  mask: {args.mask}  "
          f"max_block: {args.max_block or 'default'}  (ms = median; GB/s = nominal bytes / time)")
    print_table(rows, copy_gbs)
    if args.output:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": __import__("triton").__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "copy_bandwidth_gbs": copy_gbs, "args": vars(args), "rows": rows}
        write_json_atomic(args.output, result, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
