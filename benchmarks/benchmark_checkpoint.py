#!/usr/bin/env python3
"""Checkpoint save, load and conversion times and sizes (the trainer's own timings; the tool's wall time).

For each of TP=1 and TP=2 (gloo, CPU): train one iteration of a ~10M-parameter GPT and save it with its
optimizer state (the trainer logs the save time), load it back (the load time), then convert
TP=1 <-> TP=2 with and without optimizer state, and export to HuggingFace GPT-2.

    python benchmarks/benchmark_checkpoint.py --output benchmarks/results/checkpoint.json
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.parallel.state import free_port


def model_flags(args) -> list:
    return ["--mock-data", "--vocab-size", str(args.vocab_size), "--num-layers", str(args.num_layers),
            "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_heads),
            "--seq-length", str(args.seq_length), "--micro-batch-size", "1", "--global-batch-size", "2",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-iters", "0",
            "--distributed-backend", "gloo"]


def _run(cmd: list) -> tuple:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise InputError(f"{' '.join(cmd[:6])} ...: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout, time.time() - start


def train(nproc: int, flags: list) -> str:
    out, _ = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                   str(free_port()), "-m", "megatron_lite.pretrain_gpt"] + flags)
    return out


def dir_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def logged_seconds(stdout: str, what: str) -> float:
    m = re.search(rf"> {what} .*\(([\d.]+) s\)", stdout)
    if not m:
        raise InputError(f"the trainer did not log its {what} time")
    return float(m.group(1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output", default="benchmarks/results/checkpoint.json")
    args = p.parse_args(argv)
    return run_main(lambda: bench(args))


def bench(args) -> int:
    base = model_flags(args)
    rows = []
    _, startup = _run([sys.executable, "-c", "import torch, megatron_lite.training.checkpoint_convert"])
    with tempfile.TemporaryDirectory() as work:
        ckpt = {}
        for tp in (1, 2):
            root = os.path.join(work, f"tp{tp}")
            flags = base + ["--tensor-model-parallel-size", str(tp)]
            out = train(tp, flags + ["--train-iters", "1", "--save", root])
            params = int(re.search(r"([\d,]+) parameters\n", out).group(1).replace(",", ""))
            rows.append({"what": f"save (model + optimizer), TP={tp}", "seconds": logged_seconds(out, "saved checkpoint"),
                         "mib": dir_mib(root), "params": params})
            out = train(tp, flags + ["--train-iters", "1", "--load", root])
            rows.append({"what": f"load (model + optimizer), TP={tp}", "seconds": logged_seconds(out, "loaded checkpoint"),
                         "mib": dir_mib(root)})
            ckpt[tp] = root
        tool = [sys.executable, "tools/checkpoint_convert.py"]
        for src, dst in ((1, 2), (2, 1)):
            for optim in (False, True):
                out_dir = os.path.join(work, f"tp{src}_to_tp{dst}_{optim}")
                _, secs = _run(tool + ["--load-dir", ckpt[src], "--save-dir", out_dir, "--target-tensor-parallel-size",
                                       str(dst)] + (["--with-optim"] if optim else []))
                rows.append({"what": f"convert TP={src} -> TP={dst}" + (" with optimizer" if optim else " weights only"),
                             "seconds": secs, "mib": dir_mib(out_dir)})
        hf = os.path.join(work, "hf")
        _, secs = _run(tool + ["--load-dir", ckpt[2], "--target", "huggingface", "--save-dir", hf])
        rows.append({"what": "export TP=2 -> HuggingFace safetensors", "seconds": secs, "mib": dir_mib(hf)})
        back = os.path.join(work, "hf_back")
        _, secs = _run(tool + ["--source", "huggingface", "--load-dir", hf, "--save-dir", back,
                               "--target-tensor-parallel-size", "2"])
        rows.append({"what": "import HuggingFace -> TP=2", "seconds": secs, "mib": dir_mib(back)})
    params = rows[0]["params"]
    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}: {params / 1e6:.1f}M "
          f"parameters, fp32; tool times include {startup:.1f} s of Python/torch start-up")
    print(f"{'operation':46s} {'seconds':>8s} {'MiB on disk':>12s}")
    for r in rows:
        print(f"{r['what']:46s} {r['seconds']:8.2f} {r['mib']:12.1f}")
    write_json_atomic(args.output, {"config": vars(args), "startup_s": startup, "rows": rows})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
