#!/usr/bin/env python3
"""Whole-process speed of tools/preprocess_data.py, as a user feels it: wall time from launch to exit.

    python benchmarks/benchmark_preprocess.py --output benchmarks/results/preprocess.json

Input: the concatenation of every ``*/*.jsonl`` under --data-dir (../shared/data: tinyshakespeare,
WikiText-2 valid + test, LAMBADA, Gutenberg; ~11.5 MB), ``--append-eod``. For each vocabulary (OpenAI's
GPT-2 files and the committed 2048-token trained one) it times the default (tiktoken) path at 1 and 2
workers and the pure-Python path at 1 worker, in alternating rounds (round r runs every configuration
once, so a burst of load hits them alike), and reports medians; plus the start-up time (a one-line
input). The default and pure-Python outputs must be byte-identical. Megatron-LM is not installed here:
its time is the one the issue measured (--megatron-seconds), and the speedup is stated against it.
"""
from __future__ import annotations

import argparse
import filecmp
import glob
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError, UserError
from megatron_lite.io_utils import write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = os.path.join(ROOT, "tools", "preprocess_data.py")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SUMMARY = re.compile(r"^done: (.*)$", re.M)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (the median is reported)")
    p.add_argument("--limit-mb", type=float, default=None, help="use only the first MB of the concatenation")
    p.add_argument("--megatron-seconds", default="14,20",
                   help="Megatron-LM's tools/preprocess_data.py on the same input at 2 workers (the issue's range)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--output", default=os.path.join("benchmarks", "results", "preprocess.json"))
    return p


def concatenate(data_dir: str, path: str, limit_mb=None) -> int:
    sources = sorted(glob.glob(os.path.join(data_dir, "*", "*.jsonl")))
    if not sources:
        raise InputError(f"--data-dir {data_dir}: no */*.jsonl corpora (see shared/data/README.md)")
    limit = None if limit_mb is None else int(limit_mb * 1e6)
    written = 0
    with open(path, "wb") as out:
        for src in sources:
            with open(src, "rb") as f:
                for line in f:
                    if limit is not None and written >= limit:
                        return written
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                    written += len(line)
    return written


def vocabularies(data_dir: str) -> dict:
    out = {"gpt2": (os.path.join(data_dir, "gpt2", "gpt2-vocab.json"), os.path.join(data_dir, "gpt2", "gpt2-merges.txt")),
           "trained-2048": (os.path.join(FIXTURE, "vocab.json"), os.path.join(FIXTURE, "merges.txt"))}
    for name, files in out.items():
        for f in files:
            if not os.path.isfile(f):
                raise InputError(f"{name} vocabulary: {f}: no such file")
    return out


def run_once(input_path: str, prefix: str, vocab, impl: str, workers: int) -> dict:
    cmd = [sys.executable, PREPROCESS, "--input", input_path, "--output-prefix", prefix,
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab[0], "--merge-file", vocab[1],
           "--append-eod", "--workers", str(workers), "--tokenizer-impl", impl, "--log-interval", "100000000"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    match = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        if proc.stderr.strip():
            print(proc.stderr.strip(), file=sys.stderr, flush=True)
        raise UserError(f"{' '.join(cmd)} failed (exit {proc.returncode}; its output is above)")
    fields = dict(f.split("=", 1) for f in match.group(1).split())
    return {"wall_s": wall, "tokens": int(fields["tokens"]), "in_run_s": float(fields["seconds"])}


def run(args) -> int:
    if not os.path.isdir(args.data_dir):
        raise InputError(f"--data-dir {args.data_dir} does not exist; the benchmark needs the shared corpora")
    if args.repeats < 1:
        raise InputError(f"--repeats {args.repeats}: must be >= 1")
    vocabs = vocabularies(args.data_dir)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    corpus, one_line = os.path.join(work, "concat.jsonl"), os.path.join(work, "one_line.jsonl")
    size = concatenate(args.data_dir, corpus, args.limit_mb)
    with open(one_line, "w") as f:
        f.write('{"text": "start-up"}\n')
    configs = [(v, impl, w) for v in vocabs for impl, w in (("fast", 1), ("fast", 2), ("python", 1))]
    samples = {c: [] for c in configs}
    startup = {v: [] for v in vocabs}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for c in configs:
            v, impl, w = c
            samples[c].append(run_once(corpus, os.path.join(work, f"{v}_{impl}_w{w}"), vocabs[v], impl, w))
        for v in vocabs:
            startup[v].append(run_once(one_line, os.path.join(work, f"{v}_startup"), vocabs[v], "fast", 1)["wall_s"])
    load_after = os.getloadavg()
    rows = []
    for (v, impl, w), runs in samples.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        rows.append({"vocabulary": v, "path": "tiktoken (default)" if impl == "fast" else "pure Python",
                     "impl": impl, "workers": w, "tokens": runs[0]["tokens"], "wall_s": wall,
                     "wall_s_all": [r["wall_s"] for r in runs], "tokens_per_s": runs[0]["tokens"] / wall,
                     "in_run_s": statistics.median(r["in_run_s"] for r in runs)})
    identical = {v: all(filecmp.cmp(os.path.join(work, f"{v}_fast_w1_text_document{e}"),
                                    os.path.join(work, f"{v}_python_w1_text_document{e}"), shallow=False)
                        for e in (".bin", ".idx")) for v in vocabs}
    lo, hi = (float(x) for x in args.megatron_seconds.split(","))
    summary = {}
    for v in vocabs:
        get = {(r["impl"], r["workers"]): r for r in rows if r["vocabulary"] == v}
        f1, f2, p1 = get[("fast", 1)]["wall_s"], get[("fast", 2)]["wall_s"], get[("python", 1)]["wall_s"]
        summary[v] = {"startup_s": statistics.median(startup[v]), "workers2_over_1": f1 / f2,
                      "workers2_over_1_in_run": get[("fast", 1)]["in_run_s"] / get[("fast", 2)]["in_run_s"],
                      "fast2_over_python1": p1 / f2, "fast1_over_python1": p1 / f1,
                      "megatron_over_fast2": (lo / f2, hi / f2), "fast_equals_python": identical[v]}

    print(f"{size / 1e6:.2f} MB of JSONL, --append-eod, whole-process wall time, median of {args.repeats} "
          f"alternating rounds; {os.cpu_count()} CPUs, load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'vocabulary':<14}{'path':<20}{'workers':>8}{'tokens':>11}{'wall s':>8}{'tokens/s':>11}")
    for r in rows:
        print(f"{r['vocabulary']:<14}{r['path']:<20}{r['workers']:>8}{r['tokens']:>11}{r['wall_s']:>8.2f}"
              f"{r['tokens_per_s']:>11.0f}")
    for v, s in summary.items():
        print(f"{v}: start-up {s['startup_s']:.2f} s; 2 workers {s['workers2_over_1']:.2f}x 1 worker "
              f"({s['workers2_over_1_in_run']:.2f}x after start-up); default at 2 workers "
              f"{s['fast2_over_python1']:.1f}x the pure-Python path at 1 ({s['fast1_over_python1']:.1f}x at 1); "
              f"{s['megatron_over_fast2'][0]:.1f}-{s['megatron_over_fast2'][1]:.1f}x Megatron-LM's quoted "
              f"{lo:g}-{hi:g} s; identical output: {s['fast_equals_python']}")
    write_json_atomic(args.output, {"rows": rows, "summary": summary, "input_bytes": size, "repeats": args.repeats,
                                    "megatron_seconds_quoted": [lo, hi], "loadavg_before": load_before,
                                    "loadavg_after": load_after, "cpu_count": os.cpu_count(),
                                    "machine": platform.platform()})
    print(f"wrote {args.output}")
    return 0 if all(identical.values()) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
