#!/usr/bin/env python3
"""Decoding speed: tokens/s with the KV cache against recomputing the whole prefix at every step.

One process; the quickstart's model shape by default (4 layers, hidden 128, 4 heads, vocabulary 4096)
with --max-position-embeddings large enough for the longest run. The weights are random (speed does not
depend on them) and no end-of-text token is given, so every run decodes the full count. Greedy.

    python benchmarks/benchmark_generation.py --new-tokens 32,128,512 --output benchmarks/results/generation_cpu.json
    python benchmarks/benchmark_generation.py --preset gpt-345m --device cuda --bf16 --new-tokens 128,512 \
        --no-uncached --output benchmarks/results/generation_h200.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_lite.cli import run_main
from megatron_lite.io_utils import write_json_atomic

PRESETS = {"quickstart": dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=4096),
           "gpt-345m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=50257)}


def build(args, positions: int):
    from megatron_lite.config import parse_args, pad_vocab_size
    from megatron_lite.inference.loading import InferenceModel
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.parallel.state import initialize_parallel

    p = PRESETS[args.preset]
    flags = ["--mock-data", "--vocab-size", str(p["vocab_size"]), "--num-layers", str(p["num_layers"]),
             "--hidden-size", str(p["hidden_size"]), "--num-attention-heads", str(p["num_attention_heads"]),
             "--seq-length", str(positions), "--max-position-embeddings", str(positions),
             "--micro-batch-size", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]
    if args.bf16:
        flags.append("--bf16")
    cfg = parse_args(flags)
    ps = initialize_parallel(1, 1, 1, backend="nccl" if args.device == "cuda" else "gloo")
    ps.device_type = args.device
    m = cfg.model
    m.padded_vocab_size = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    model_parallel_seed(cfg.train.seed, ps)
    chunks = [c.to(ps.device).eval() for c in build_model_chunks(cfg, ps)]
    return InferenceModel(chunks, cfg, ps, 0)


def timed(model, prompts, new_tokens: int, use_cache: bool, device: str) -> float:
    import torch
    from megatron_lite.inference.generation import generate

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, use_cache=use_cache)  # greedy, no EOD: full length
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert all(len(g.generated) == new_tokens for g in out)
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    ap.add_argument("--new-tokens", default="32,128,512")
    ap.add_argument("--prompt-length", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the recompute baseline (slow for big models)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)

    def body() -> int:
        import statistics

        import torch

        counts = [int(x) for x in args.new_tokens.split(",")]
        model = build(args, args.prompt_length + max(counts))
        g = torch.Generator().manual_seed(0)
        vocab = model.cfg.model.vocab_size
        prompts = [torch.randint(0, vocab, (args.prompt_length,), generator=g).tolist()
                   for _ in range(args.batch_size)]
        timed(model, prompts, 4, True, args.device)  # warm-up
        rows = []
        for n in counts:
            row = {"new_tokens": n}
            for name, cached in (("cached", True), ("uncached", False)):
                if not cached and args.no_uncached:
                    continue
                secs = statistics.median(timed(model, prompts, n, cached, args.device) for _ in range(args.repeats))
                row[f"{name}_s"] = secs
                row[f"{name}_tokens_per_s"] = n * args.batch_size / secs
            if "uncached_s" in row:
                row["speedup"] = row["uncached_s"] / row["cached_s"]
            rows.append(row)
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"{args.preset}, batch {args.batch_size}, prompt {args.prompt_length} tokens, "
              f"{'bf16' if args.bf16 else 'fp32'}, {device}, torch threads {torch.get_num_threads()}")
        print(f"{'new tokens':>10} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}")
        for r in rows:
            print(f"{r['new_tokens']:>10} {r['cached_tokens_per_s']:>13.1f} "
                  f"{r.get('uncached_tokens_per_s', float('nan')):>15.1f} {r.get('speedup', float('nan')):>8.2f}")
        if args.output:
            write_json_atomic(args.output, {"preset": args.preset, "batch_size": args.batch_size,
                                            "prompt_length": args.prompt_length, "bf16": args.bf16,
                                            "device": device, "rows": rows, "argv": sys.argv[1:]})
        return 0

    try:
        return run_main(body)
    finally:
        from megatron_lite.parallel.state import destroy_parallel
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
