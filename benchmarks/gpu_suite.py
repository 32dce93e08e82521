#!/usr/bin/env python3
"""Every GPU figure the project reports, from one command on a machine with one CUDA GPU, in < 8 min.

    bash benchmarks/gpu_suite.sh                 # writes benchmarks/results/gpu_suite/gpu_suite.{json,md}

1. the fused-softmax kernel on the real device: forward and backward against torch's reference
   (max abs error), then its time and bandwidth against a device copy at seq 1k-16k
   (``benchmark_kernels.run_case``; batch x heads shrinks as seq grows so every case fits);
2. a bf16 training step (forward, backward, fused AdamW) of GPT 125M, 350M, 760M and 1.3B at seq 2048
   with each attention backend (``benchmark_throughput.run_case``): step time, TFLOP/s, MFU against
   the device's dense peak (``training/metrics.py``'s table), peak memory against ``model/memory.py``;
3. the layout sweep at world size 1 through the trainer (``benchmark_layouts.py``): GPT 1.3B over
   micro-batch size x recompute x attention backend, within what is left of the time budget.

Without CUDA it says so and runs the same code path tiny on the CPU (the figures are then no GPU
figures), and exits 0; the test suite runs that path.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark_throughput as bt  # noqa: E402

from megatron_lite.cli import run_main  # noqa: E402
from megatron_lite.config import parse_args as parse_trainer_args, validate  # noqa: E402
from megatron_lite.io_utils import atomic_write_text, write_json_atomic  # noqa: E402
from megatron_lite.model.memory import estimate_memory  # noqa: E402
from megatron_lite.training.metrics import device_peak_tflops  # noqa: E402

BACKENDS = ("unfused", "fused_softmax", "sdpa")
GPU = dict(models=["125M", "350M", "760M", "1.3B"], seq=2048, mbs=4, dtype="bf16", warmup=3, iters=10,
           check_seqs=[128, 1000, 4096], kernel_seqs=[1024, 2048, 4096, 8192, 16384], sweep_model="1.3B",
           sweep_layouts=[f"tp1pp1dp1mbs{b}{rc}+{a}" for a in ("sdpa", "fused_softmax") for b in (2, 4, 8)
                          for rc in ("", "+selective")] + ["tp1pp1dp1mbs8+full+sdpa"], sweep_gbs=16)
CPU = dict(models=["tiny"], seq=64, mbs=2, dtype="fp32", warmup=1, iters=2, check_seqs=[64, 100], kernel_seqs=[],
           sweep_model="tiny", sweep_layouts=["tp1pp1dp1mbs2+selective+unfused"], sweep_gbs=2)


def kernel_correctness(device, seqs) -> list:
    """Max abs error of the module's forward/backward against the reference (the kernel on CUDA)."""
    from megatron_lite.kernels.fused_softmax import FusedScaleMaskSoftmax, scale_mask_softmax_reference

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for s in seqs:
        for mask_kind in ("causal", "padding"):
            module = FusedScaleMaskSoftmax(causal=mask_kind == "causal", scale=0.125)
            x = torch.randn(2, 4, s, s, device=device, dtype=dtype, requires_grad=True)
            mask = None
            if mask_kind == "padding":
                mask = torch.zeros(2, 1, 1, s, dtype=torch.bool, device=device)
                mask[..., s - s // 4:] = True
            dy = torch.randn_like(x)
            y = module(x, mask)
            (dx,) = torch.autograd.grad(y, x, dy)
            xr = x.detach().float().requires_grad_(True)
            yr = scale_mask_softmax_reference(xr, mask, 0.125, mask_kind == "causal")
            (dxr,) = torch.autograd.grad(yr, xr, dy.float())
            rows.append({"seq": s, "mask": mask_kind, "dtype": str(dtype).replace("torch.", ""),
                         "kernel_used": module.uses_kernel(x.detach(), mask),
                         "fwd_max_abs_err": (y.float() - yr).abs().max().item(),
                         "bwd_max_abs_err": (dx.float() - dxr).abs().max().item()})
    return rows


def kernel_bandwidth(seqs) -> dict:
    import benchmark_kernels as bk

    args = argparse.Namespace(dtype="bf16", mask="causal", scale=0.125, max_block=None, warmup_ms=10, rep_ms=40)
    copy_gbs = bk.copy_bandwidth_gbs(args)
    rows = [bk.run_case(max(1, 2 ** 27 // s ** 2), s, args, copy_gbs) for s in seqs]
    return {"copy_bandwidth_gbs": copy_gbs, "rows": rows}


def training_steps(plan, device, pstate, peak) -> list:
    rows = []
    for name in plan["models"]:
        for backend in BACKENDS:
            args = argparse.Namespace(micro_batch_size=plan["mbs"], dtype=plan["dtype"], attention_backend=backend,
                                      vocab_size=None, warmup=plan["warmup"], iters=plan["iters"],
                                      optimizer_impl="auto")
            row = bt.run_case(name, plan["seq"], args, device, pstate)
            row["requested_backend"] = backend
            if "tflops_per_device" in row and peak:
                row["mfu_pct"] = 100 * row["tflops_per_device"] / peak
            row["est_memory_gib"] = estimated_gib(name, plan, backend, device)
            print(f"  {name} {backend}: " + (row.get("error") or f"{row['step_time_s'] * 1000:.1f} ms/step, "
                  f"{row['tflops_per_device']:.1f} TFLOP/s, peak {row['peak_memory_gib']:.2f} GiB "
                  f"(estimate {row['est_memory_gib']:.2f})"), flush=True)
            rows.append(row)
    return rows


def estimated_gib(name, plan, backend, device) -> float:
    layers, hidden, heads = bt.MODELS[name]
    flags = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
             "--seq-length", str(plan["seq"]), "--vocab-size", str(1024 if name == "tiny" else bt.GPT2_VOCAB),
             "--micro-batch-size", str(plan["mbs"]), "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0",
             "--attention-backend", backend] + (["--bf16"] if plan["dtype"] == "bf16" else [])
    cfg = parse_trainer_args(flags)
    validate(cfg, 1)
    return estimate_memory(cfg, device.type).max_total_bytes / 2 ** 30


def layout_sweep(plan, out_dir, budget_s) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "benchmark_layouts.py"), "--nproc-per-node", "1",
           "--model", plan["sweep_model"], "--seq-length", str(plan["seq"]), "--global-batch-size", str(plan["sweep_gbs"]),
           "--layouts", ",".join(plan["sweep_layouts"]), "--warmup-iters", str(plan["warmup"] - 1 or 1),
           "--iters", str(max(2, plan["iters"] // 2)), "--time-budget-s", str(max(budget_s, 1)),
           "--timeout-per-layout", "240", "--output-dir", os.path.join(out_dir, "layouts")]
    if plan["dtype"] == "fp32":
        cmd += ["--precision", "fp32"]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    print(proc.stdout[-4000:], end="", flush=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    import json
    with open(os.path.join(out_dir, "layouts", "layouts.json"), encoding="utf-8") as f:
        return json.load(f)


def markdown(result) -> str:
    lines = [f"# GPU suite: {result['device']}", "", f"torch {result['torch']}, {result['time']}; MFU peak "
             f"{result['peak_tflops']} TFLOP/s ({result['peak_source']}); {result['total_s']:.0f} s in all", ""]
    lines += ["## Fused softmax: correctness against torch", "", "| seq | mask | dtype | kernel | fwd max err | bwd max err |",
              "| ---: | --- | --- | --- | ---: | ---: |"]
    lines += [f"| {r['seq']} | {r['mask']} | {r['dtype']} | {r['kernel_used']} | {r['fwd_max_abs_err']:.2e} | "
              f"{r['bwd_max_abs_err']:.2e} |" for r in result["kernel_correctness"]]
    bw = result.get("kernel_bandwidth")
    if bw:
        lines += ["", f"## Fused softmax bandwidth (copy: {bw['copy_bandwidth_gbs']:.0f} GB/s)", "",
                  "| bh | seq | fwd GB/s | fwd % copy | fwd x torch | bwd GB/s | bwd % copy | bwd x torch |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in bw["rows"]:
            cells = []
            for d in ("fwd", "bwd"):
                t = r[d]["triton"]
                cells += [f"{t['gbs']:.0f}" if "gbs" in t else "OOM", f"{t.get('pct_of_copy', 0):.0f}",
                          f"{r[d].get('speedup_vs_torch', 0):.2f}"]
            lines.append(f"| {r['bh']} | {r['seq']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Training step ({result['plan']['dtype']}, seq {result['plan']['seq']}, micro-batch "
              f"{result['plan']['mbs']}, the trainer's AdamW: fused on CUDA)", "",
              "| model | attention | step ms | tokens/s | TFLOP/s | MFU % | peak GiB | estimate GiB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['requested_backend']} | {r['error']} | | | | | {r['est_memory_gib']:.2f} |")
            continue
        mfu = f"{r['mfu_pct']:.1f}" if "mfu_pct" in r else "-"
        lines.append(f"| {r['model']} | {r['attention_backend']} | {r['step_time_s'] * 1000:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tflops_per_device']:.1f} | {mfu} | {r['peak_memory_gib']:.2f} | "
                     f"{r['est_memory_gib']:.2f} |")
    sweep = result.get("layout_sweep", {})
    lines += ["", "## Layout sweep at world size 1 (through the trainer)", ""]
    if "rows" in sweep:
        lines += ["| # | layout | tokens/s | MFU % | peak GiB | estimate GiB | status |", "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in sweep["rows"]:
            mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") else "-"
            speed = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
            peak = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") else "-"
            est = f"{r['est_mem_gib']:.2f}" if "est_mem_gib" in r else "-"
            lines.append(f"| {r.get('rank', '-')} | {r['layout']} | {speed} | {mfu} | {peak} | {est} | "
                         f"{r['status']} {r.get('reason', '')} |")
    else:
        lines.append(f"failed: {sweep.get('error')}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    started = time.time()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
        from megatron_lite.parallel.state import ParallelState
        pstate, name, plan = ParallelState(backend="nccl"), torch.cuda.get_device_name(device), GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        peak, source = device_peak_tflops(name, plan["dtype"])
        if peak is None:
            print(f"warning: {source}; MFU left out (the table is in megatron_lite/training/metrics.py)", file=sys.stderr)
    else:
        print("no CUDA device: running the CPU smoke path of the same code (tiny sizes; these are not GPU figures)")
        from megatron_lite.parallel.state import ParallelState
        device, pstate, name, plan = torch.device("cpu"), ParallelState(), "CPU (smoke path)", CPU
        peak, source = None, "no peak for a CPU"
    print(f"device: {name}; MFU peak: {peak} ({source})", flush=True)
    result = {"device": name, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "peak_tflops": peak, "peak_source": source, "plan": {k: v for k, v in plan.items()}}
    print("== 1/3 fused softmax", flush=True)
    result["kernel_correctness"] = kernel_correctness(device, plan["check_seqs"])
    if cuda:
        result["kernel_bandwidth"] = kernel_bandwidth(plan["kernel_seqs"])
    print("== 2/3 training step per model and attention backend", flush=True)
    result["training"] = training_steps(plan, device, pstate, peak)
    if cuda:
        torch.cuda.empty_cache()
    print("== 3/3 layout sweep at world size 1", flush=True)
    result["layout_sweep"] = layout_sweep(plan, args.output_dir, args.budget_s - (time.time() - started) - 30)
    result["total_s"] = time.time() - started
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "gpu_suite.json")
    md_path = os.path.join(args.output_dir, "gpu_suite.md")
    write_json_atomic(json_path, result)
    atomic_write_text(md_path, markdown(result))
    print(f"wrote {json_path} and {md_path} ({result['total_s']:.0f} s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Every GPU figure of the project in one run (CPU smoke path without CUDA).")
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "gpu_suite"))
    p.add_argument("--budget-s", type=float, default=460.0,
                   help="whole-suite budget; the layout sweep starts no layout past it")
    return run_main(lambda: run(p.parse_args(argv)), usage_status=2)


if __name__ == "__main__":
    sys.exit(main())
