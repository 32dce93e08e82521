#!/usr/bin/env python3
"""Restart after a kill -9: two torchrun agents (c10d on 127.0.0.1, 2 workers each, TP=2 x DP=2, CPU/gloo)
train with --save = --load and --max-restarts 1; one worker is killed with SIGKILL. Measures the time
from the kill to the first iteration of the restarted group, and the iterations lost (those since the
last checkpoint, at most --save-interval).

    python benchmarks/benchmark_restart.py --output benchmarks/results/restart.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.parallel.state import free_port


def records(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip() and '"split"' not in l]


def one_trial(args, work: str, trial: int) -> dict:
    root, metrics = os.path.join(work, f"ckpt{trial}"), os.path.join(work, f"m{trial}.jsonl")
    flags = ["--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
             "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "1",
             "--global-batch-size", "4", "--train-iters", str(args.train_iters), "--log-interval", "1",
             "--eval-iters", "0", "--distributed-backend", "gloo", "--tensor-model-parallel-size", "2",
             "--save", root, "--load", root, "--save-interval", str(args.save_interval), "--metrics-jsonl", metrics]
    port, env = free_port(), dict(os.environ, OMP_NUM_THREADS="1")
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                                "2", "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                f"127.0.0.1:{port}", "--rdzv-id", f"bench{port}", "--monitor-interval", "0.5",
                                "-m", "megatron_lite.pretrain_gpt", *flags], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for _ in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and len(records(metrics)) < args.kill_after:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    if len(workers) != 2:
        raise InputError("the training job did not start its workers")
    killed_at = max(r["iteration"] for r in records(metrics))
    seen = len(records(metrics))
    os.kill(int(workers[0]), signal.SIGKILL)
    t_kill = time.time()
    first_resumed = None
    while time.time() < deadline and first_resumed is None:
        recs = records(metrics)
        later = [r for r in recs[seen:] if r["iteration"] <= killed_at]  # the restarted group repeats iterations
        if later:
            first_resumed = time.time() - t_kill, later[0]["iteration"]
        time.sleep(0.02)
    codes = [a.wait(timeout=300) for a in agents]
    if codes != [0, 0] or first_resumed is None:
        raise InputError(f"the restarted job failed (exit codes {codes})")
    return {"killed_at_iteration": killed_at, "resumed_from_iteration": first_resumed[1] - 1,
            "iterations_lost": killed_at - (first_resumed[1] - 1), "seconds_to_first_resumed_iteration": first_resumed[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--save-interval", type=int, default=10)
    p.add_argument("--kill-after", type=int, default=25, help="kill once this many iterations are logged")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/restart.json")
    args = p.parse_args(argv)
    return run_main(lambda: bench(args))


def bench(args) -> int:
    with tempfile.TemporaryDirectory() as work:
        rows = [one_trial(args, work, t) for t in range(args.trials)]
    print(f"kill -9 of one of 4 workers (2 agents x 2, TP=2 x DP=2, gloo), --save-interval {args.save_interval}, "
          "--max-restarts 1")
    print(f"{'trial':>5s} {'killed at':>9s} {'resumed from':>12s} {'lost':>4s} {'kill -> first resumed iteration':>32s}")
    for i, r in enumerate(rows):
        print(f"{i:5d} {r['killed_at_iteration']:9d} {r['resumed_from_iteration']:12d} {r['iterations_lost']:4d} "
              f"{r['seconds_to_first_resumed_iteration']:30.1f} s")
    write_json_atomic(args.output, {"config": vars(args), "trials": rows})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
