"""Time and measure the GPT sample index build at pretraining scale, without a .bin.

    python benchmarks/benchmark_index.py --output benchmarks/results/index.json

Draws a seeded array of document lengths (default 5e6 documents, 1e9 tokens, 1 + geometric
lengths averaging 200), then builds (doc_idx, sample_idx, shuffle_idx) for --epochs epochs of
samples at --seq-length, exactly as GPTDataset does. Reports wall time of the build, of saving
the cache (.npy) and of loading it back with mmap, and memory: the RSS peak over the RSS just
before the build, and the build's peak of traced allocations (tracemalloc sees numpy arrays).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from megatron_lite.cli import run_main
from megatron_lite.data.gpt_dataset import build_sample_indices
from megatron_lite.data.index_cache import load_or_build_cached
from megatron_lite.errors import ConfigError
from megatron_lite.io_utils import write_json_atomic

MiB = 1024 * 1024


def synthetic_lengths(num_documents: int, num_tokens: int, seed: int) -> np.ndarray:
    """int32 lengths >= 1 summing exactly to num_tokens, 1 + geometric around the mean."""
    mean = num_tokens / num_documents
    if mean < 2:
        raise ConfigError("--num-tokens must be at least twice --num-documents")
    rng = np.random.default_rng(seed)
    lengths = (1 + rng.geometric(1.0 / (mean - 1), size=num_documents)).astype(np.int32)
    short = num_tokens - int(lengths.sum(dtype=np.int64))  # correct the total one token at a time
    if short > 0:
        np.add.at(lengths, rng.integers(0, num_documents, short), 1)
    excess = -short
    while excess > 0:  # a few rounds at most: each takes one token from up to every document longer than 1
        candidates = np.flatnonzero(lengths > 1)
        take = min(excess, len(candidates))
        lengths[rng.choice(candidates, take, replace=False)] -= 1
        excess -= take
    return lengths


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(args) -> dict:
    t0 = time.perf_counter()
    lengths = synthetic_lengths(args.num_documents, args.num_tokens, args.seed)
    gen_s = time.perf_counter() - t0
    docs = np.arange(args.num_documents, dtype=np.int64)
    num_samples = args.epochs * (args.num_tokens - 1) // args.seq_length

    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    doc_idx, sample_idx, shuffle_idx = build_sample_indices(lengths, docs, args.seq_length, num_samples, args.seed)
    build_s = time.perf_counter() - t0
    rss_peak = peak_rss_mib()
    index_mib = (doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes) / MiB
    del doc_idx, sample_idx, shuffle_idx

    tracemalloc.start()
    build_sample_indices(lengths, docs, args.seq_length, num_samples, args.seed)
    traced_peak = tracemalloc.get_traced_memory()[1] / MiB
    tracemalloc.stop()

    cache_dir = tempfile.mkdtemp(prefix="index-bench-", dir=args.cache_root)
    try:
        description = {"benchmark": vars(args)}
        build = lambda: build_sample_indices(lengths, docs, args.seq_length, num_samples, args.seed)  # noqa: E731
        names = ("doc_idx", "sample_idx", "shuffle_idx")
        t0 = time.perf_counter()
        load_or_build_cached(cache_dir, "bench", description, names, build)
        build_save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_or_build_cached(cache_dir, "bench", description, names, build)
        load_s = time.perf_counter() - t0
        total = len(loaded["shuffle_idx"])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    return {
        "num_documents": args.num_documents, "num_tokens": args.num_tokens, "seq_length": args.seq_length,
        "epochs": args.epochs, "requested_samples": num_samples, "built_samples": total,
        "mean_doc_length": args.num_tokens / args.num_documents,
        "generate_lengths_s": round(gen_s, 3), "build_s": round(build_s, 3),
        "build_and_save_s": round(build_save_s, 3), "load_mmap_s": round(load_s, 4),
        "index_size_mib": round(index_mib, 1), "rss_before_build_mib": round(rss_before, 1),
        "rss_peak_mib": round(rss_peak, 1), "rss_growth_mib": round(rss_peak - rss_before, 1),
        "traced_peak_mib": round(traced_peak, 1),
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-documents", type=float, default=5e6)
    p.add_argument("--num-tokens", type=float, default=1e9)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1, help="samples requested = epochs x one epoch's samples")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-root", default=None, help="where the temporary cache goes (default: system tmp)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.num_documents, args.num_tokens = int(args.num_documents), int(args.num_tokens)
    if args.num_documents < 1 or args.seq_length < 1 or args.epochs < 1:
        p.error("--num-documents, --seq-length and --epochs must be >= 1")
    if args.num_tokens < args.seq_length + 1:
        p.error(f"--num-tokens must exceed --seq-length ({args.seq_length})")
    return run_main(lambda: report(args))


def report(args) -> int:
    result = run(args)
    rows = [("documents", f"{result['num_documents']:,}"), ("tokens", f"{result['num_tokens']:,}"),
            ("seq_length", result["seq_length"]), ("samples requested / built",
                                                   f"{result['requested_samples']:,} / {result['built_samples']:,}"),
            ("build index (s)", result["build_s"]), ("build + save .npy (s)", result["build_and_save_s"]),
            ("load with mmap (s)", result["load_mmap_s"]), ("index on disk (MiB)", result["index_size_mib"]),
            ("RSS growth during build (MiB)", result["rss_growth_mib"]),
            ("traced peak of build (MiB)", result["traced_peak_mib"])]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.output:
        write_json_atomic(args.output, result, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
