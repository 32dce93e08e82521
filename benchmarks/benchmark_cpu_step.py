#!/usr/bin/env python3
"""CPU training-step figures for a ~10M-parameter GPT (the tensor-parallel issue's benchmark).

Measures, in one run:
  1. the torch fp32 matmul rate of this CPU (the ceiling for achieved FLOP/s);
  2. megatron_lite's single-process step (forward + backward + AdamW): tokens/s and achieved FLOP/s;
  3. a minimal plain-PyTorch GPT of the same shape and math (written here), same step;
  4. TP=2 on 2 processes (gloo, 1 thread each) against TP=1 on 1 process with 1 and 2 threads.

    python benchmarks/benchmark_cpu_step.py --output benchmarks/results/cpu_step.json
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.cli import run_main
from megatron_lite.config import ModelConfig, pad_vocab_size
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.model.flops import num_floating_point_operations


def model_config(args, tp: int = 1) -> ModelConfig:
    cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_heads, seq_length=args.seq_length,
                      max_position_embeddings=args.seq_length, vocab_size=args.vocab_size,
                      hidden_dropout=0.0, attention_dropout=0.0, attention_backend="sdpa")
    cfg.padded_vocab_size = pad_vocab_size(args.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    return cfg


# ---- a minimal plain-PyTorch GPT with the same shape and math --------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):  # [b, s, h]
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, self.heads, 3, h // self.heads).unbind(3)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size)
                                    for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens, pos, labels):
        x = self.wte(tokens) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1))


# ---- timing ------------------------------------------------------------------------------------------
def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def time_steps(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def batch(args, vocab):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length + 1), generator=g)
    pos = torch.arange(args.seq_length).unsqueeze(0).expand(args.micro_batch_size, -1)
    return tokens[:, :-1].contiguous(), pos, tokens[:, 1:].contiguous()


def ours_step_fn(args, pstate=None):
    from megatron_lite.model.gpt import GPTModel
    from megatron_lite.parallel.state import ParallelState
    pstate = pstate or ParallelState()  # one process: TP = PP = DP = 1, no group needed
    cfg = model_config(args, tp=pstate.tp_size)
    model = GPTModel(cfg, pstate=pstate, seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, pos, labels = batch(args, args.vocab_size)

    def step():
        opt.zero_grad(set_to_none=True)
        model(tokens, pos, None, labels=labels).mean().backward()
        opt.step()
    return step, cfg, sum(p.numel() for p in model.parameters())


def plain_step_fn(args):
    cfg = model_config(args)
    model = PlainGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, pos, labels = batch(args, args.vocab_size)

    def step():
        opt.zero_grad(set_to_none=True)
        model(tokens, pos, labels).backward()
        opt.step()
    return step


def _tp2_worker(rank, world, args_dict, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from megatron_lite.parallel.state import initialize_parallel
    ps = initialize_parallel(tensor=world, backend="gloo")
    step, _, _ = ours_step_fn(argparse.Namespace(**args_dict), ps)
    t = time_steps(step, args_dict["warmup"], args_dict["iters"])
    if rank == 0:
        q.put(t)
    torch.distributed.destroy_process_group()


def tp2_step_time(args) -> float:
    import torch.multiprocessing as mp
    from megatron_lite.parallel.state import free_port
    os.environ["MASTER_PORT"] = str(free_port())
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tp2_worker, args=(r, 2, vars(args), q)) for r in range(2)]
    for p in procs:
        p.start()
    t = q.get(timeout=600)
    for p in procs:
        p.join()
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--num-layers", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--output", default="benchmarks/results/cpu_step.json")
    args = p.parse_args(argv)
    return run_main(lambda: run(args))


def run(args) -> int:
    rows = []
    tokens = args.micro_batch_size * args.seq_length
    for threads in (1, 2):
        torch.set_num_threads(threads)
        mm = matmul_gflops()
        step, cfg, n_params = ours_step_fn(args)
        t_ours = time_steps(step, args.warmup, args.iters)
        t_plain = time_steps(plain_step_fn(args), args.warmup, args.iters)
        flops = num_floating_point_operations(cfg, args.micro_batch_size)
        rows.append(dict(layout="TP=1, 1 process", threads=threads, params_m=n_params / 1e6,
                         matmul_gflops=mm, ours_step_s=t_ours, plain_step_s=t_plain,
                         ours_vs_plain=t_ours / t_plain, tokens_per_s=tokens / t_ours,
                         achieved_gflops=flops / t_ours / 1e9, fraction_of_matmul=flops / t_ours / 1e9 / mm))
    t_tp2 = tp2_step_time(args)
    rows.append(dict(layout="TP=2, 2 processes x 1 thread (gloo)", threads=1, ours_step_s=t_tp2,
                     tokens_per_s=tokens / t_tp2, achieved_gflops=flops / t_tp2 / 1e9))

    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, {args.num_heads} heads, seq {args.seq_length}, "
          f"vocab {args.vocab_size}, micro-batch {args.micro_batch_size}: {rows[0]['params_m']:.1f}M parameters, "
          f"{flops / 1e9:.1f} GFLOP per step")
    print(f"{'layout':40s} {'thr':>3s} {'step s':>8s} {'plain s':>8s} {'ours/plain':>10s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'matmul GFLOP/s':>14s} {'of matmul':>9s}")
    cols = [("ours_step_s", 8, ".3f"), ("plain_step_s", 8, ".3f"), ("ours_vs_plain", 10, ".3f"),
            ("tokens_per_s", 9, ".0f"), ("achieved_gflops", 8, ".1f"), ("matmul_gflops", 14, ".1f"),
            ("fraction_of_matmul", 9, ".1%")]
    for r in rows:
        cells = [format(r[k], f">{w}{fmt}") if k in r else format("-", f">{w}") for k, w, fmt in cols]
        print(f"{r['layout']:40s} {r['threads']:>3d} " + " ".join(cells))
    write_json_atomic(args.output, {"config": vars(args), "gflop_per_step": flops / 1e9, "rows": rows}, indent=2)
    print(f"wrote {args.output}")
    return 0 if all(math.isfinite(r["ours_step_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
