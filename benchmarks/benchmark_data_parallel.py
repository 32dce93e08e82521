#!/usr/bin/env python3
"""Data-parallel step time and optimizer memory through the real entry point (torchrun, gloo, CPU).

1. Step time at DP=2: all-reduce after backward, --overlap-grad-reduce, --use-distributed-optimizer
   (ZeRO-1), and ZeRO-1 with overlapped reduction and parameter all-gather; the bucket count and
   sizes each run reports at startup.
2. Optimizer state per rank (Adam moments + fp32 masters, measured after training) at DP = 1, 2, 4,
   with and without ZeRO-1, for fp32 and bf16.

    python benchmarks/benchmark_data_parallel.py --output benchmarks/results/data_parallel.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.parallel.state import free_port

STEP_VARIANTS = {
    "all-reduce after backward": [],
    "--overlap-grad-reduce": ["--overlap-grad-reduce"],
    "--use-distributed-optimizer": ["--use-distributed-optimizer"],
    "ZeRO-1 + overlap grad reduce + param gather": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                                    "--overlap-param-gather"],
}


def model_flags(args) -> list:
    return ["--mock-data", "--vocab-size", str(args.vocab_size), "--num-layers", str(args.num_layers),
            "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_heads),
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-4", "--log-interval", "1",
            "--eval-iters", "0", "--eval-interval", "100000", "--distributed-backend", "gloo",
            "--ddp-bucket-size", str(args.bucket_size)]


def run(nproc: int, flags: list, workdir: str, name: str) -> dict:
    metrics = os.path.join(workdir, re.sub(r"\W+", "_", name) + ".jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "megatron_lite.pretrain_gpt"] + flags + ["--metrics-jsonl", metrics]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise InputError(f"{name}: the training run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    times = [json.loads(l)["iter_time_s"] for l in open(metrics) if '"iter_time_s"' in l]
    buckets = re.search(r"gradients in (.*)", proc.stdout)
    state = re.search(r"optimizer state on rank 0: ([\d,]+) bytes", proc.stdout)
    return {"iter_times_s": times, "buckets": buckets.group(1) if buckets else None,
            "optimizer_state_bytes_rank0": int(state.group(1).replace(",", "")) if state else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--bucket-size", type=int, default=1_000_000, help="--ddp-bucket-size for every run")
    p.add_argument("--dp-sizes", default="1,2,4", help="DP sizes of the optimizer-memory table")
    p.add_argument("--precisions", default="fp32,bf16", help="precisions of the optimizer-memory table")
    p.add_argument("--output", default="benchmarks/results/data_parallel.json")
    args = p.parse_args(argv)
    return run_main(lambda: bench(args))


def bench(args) -> int:
    base = model_flags(args)
    steps, memory = [], []
    with tempfile.TemporaryDirectory() as workdir:
        known = {}  # (precision, dp, zero1) -> measured optimizer bytes: the DP=2 step runs count too
        for name, extra in STEP_VARIANTS.items():
            r = run(2, base + extra, workdir, name)
            t = statistics.median(r["iter_times_s"][2:] or r["iter_times_s"])  # after warm-up
            steps.append({"variant": name, "dp": 2, "step_s": t, "buckets": r["buckets"]})
            if name in ("all-reduce after backward", "--use-distributed-optimizer"):
                known[("fp32", 2, name != "all-reduce after backward")] = r["optimizer_state_bytes_rank0"]
        mem_flags = [f if f != str(args.iters) else "2" for f in base]  # two steps are enough to measure state
        dp_sizes = [int(x) for x in args.dp_sizes.split(",")]
        if 1 not in dp_sizes:
            raise InputError("--dp-sizes must include 1 (the unsharded reference)")
        for precision in args.precisions.split(","):
            if precision not in ("fp32", "bf16", "fp16"):
                raise InputError(f"--precisions: {precision!r} is not fp32, bf16 or fp16")
            for dp in dp_sizes:
                for zero in (False, True):
                    extra = ([] if precision == "fp32" else [f"--{precision}"]) + \
                        (["--use-distributed-optimizer"] if zero else [])
                    key = (precision, dp, zero)
                    if key not in known:
                        known[key] = run(dp, mem_flags + extra, workdir, f"mem_{precision}_{dp}_{zero}")[
                            "optimizer_state_bytes_rank0"]
                    memory.append({"precision": precision, "dp": dp, "zero1": zero,
                                   "optimizer_state_bytes_per_rank": known[key]})
    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, vocab {args.vocab_size}, "
          f"micro-batch {args.micro_batch_size}, global batch {args.global_batch_size}; 2 ranks x 1 thread, gloo")
    print(f"{'DP=2 variant':46s} {'step s':>8s}  buckets")
    for r in steps:
        print(f"{r['variant']:46s} {r['step_s']:8.3f}  {r['buckets']}")
    print(f"\n{'precision':9s} {'DP':>3s} {'ZeRO-1':>6s} {'optimizer state per rank':>26s} {'of DP=1':>8s}")
    for r in memory:
        ref = next(m for m in memory if m["precision"] == r["precision"] and m["dp"] == 1 and not m["zero1"])
        ratio = r["optimizer_state_bytes_per_rank"] / ref["optimizer_state_bytes_per_rank"]
        print(f"{r['precision']:9s} {r['dp']:3d} {str(r['zero1']):>6s} "
              f"{r['optimizer_state_bytes_per_rank'] / 2 ** 20:22.2f} MiB {ratio:8.3f}")
    write_json_atomic(args.output, {"config": vars(args), "step_time": steps, "optimizer_memory": memory})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
