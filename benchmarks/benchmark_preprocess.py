"""Throughput of tools/preprocess_data.py: fast (Rust) vs pure-Python tokenizer, 1 and 2 workers.

    python benchmarks/benchmark_preprocess.py --output benchmarks/results/preprocess.json

Builds a JSONL of at least --size-mb MB by repeating the corpora in ../shared/data, then runs the
preprocessing tool as a user would (a subprocess per configuration) and reads its summary line.
The pure-Python path runs on the first --python-mb MB only and is reported as tokens/s (a rate,
so it compares directly); on that slice the fast path is run too and both outputs must be
byte-identical. Defaults to the committed test tokenizer; pass --vocab-file/--merge-file for another.
"""

import argparse
import filecmp
import glob
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError, UserError
from megatron_lite.io_utils import write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = os.path.join(ROOT, "tools", "preprocess_data.py")
FIXTURE_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SUMMARY = re.compile(r"^done: (.*)$", re.M)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                   help="folder with the *.jsonl corpora (default: ../shared/data)")
    p.add_argument("--vocab-file", default=os.path.join(FIXTURE_TOKENIZER, "vocab.json"))
    p.add_argument("--merge-file", default=os.path.join(FIXTURE_TOKENIZER, "merges.txt"))
    p.add_argument("--size-mb", type=float, default=20.0, help="JSONL size for the fast-path runs")
    p.add_argument("--python-mb", type=float, default=2.0, help="slice size for the pure-Python run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="fast-path worker counts")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--output", default=os.path.join("benchmarks", "results", "preprocess.json"))
    return p


def corpus_lines(sources):
    """Lines from the corpora, always from the one with the fewest bytes given so far (forever).

    Equal bytes per corpus at every point makes any prefix a fair mix, so the small slice has the
    big corpus's make-up; a corpus that runs out starts again from its first line."""
    files = [open(src, "rb") for src in sources]
    given = [0] * len(sources)
    try:
        while True:
            i = given.index(min(given))
            line = files[i].readline()
            if not line:
                files[i].close()
                files[i] = open(sources[i], "rb")
                line = files[i].readline()
            given[i] += len(line)
            if line.strip():
                yield line if line.endswith(b"\n") else line + b"\n"
    finally:
        for f in files:
            f.close()


def _has_text(path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def make_jsonl(data_dir, path, size_mb):
    """Write at least size_mb MB of JSONL taken from the *.jsonl corpora under data_dir."""
    sources = [src for src in sorted(glob.glob(os.path.join(data_dir, "**", "*.jsonl"), recursive=True))
               if _has_text(src)]  # a corpus of blank lines would keep corpus_lines looping forever
    if not sources:
        raise InputError(f"--data-dir {data_dir}: no non-empty *.jsonl corpora found "
                         f"(the shared corpora are needed; see shared/data/README.md)")
    target, written = int(size_mb * 1e6), 0
    lines = corpus_lines(sources)
    with open(path, "wb") as out:
        while written < target:
            line = next(lines)
            out.write(line)
            written += len(line)
    lines.close()
    return written


def _children_cpu():
    # CPU seconds of finished children (the tool and its pool workers): a figure that, unlike
    # wall time, does not grow when other jobs share the machine.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_preprocess(input_path, prefix, impl, workers, args):
    cmd = [sys.executable, PREPROCESS, "--input", input_path, "--output-prefix", prefix,
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", args.vocab_file,
           "--merge-file", args.merge_file, "--append-eod", "--workers", str(workers),
           "--tokenizer-impl", impl, "--log-interval", "100000000"]
    start, cpu_before = time.time(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.time() - start, _children_cpu() - cpu_before
    match = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        # The tool's own report first (its error line names the cause), then one line for ours.
        if proc.stderr.strip():
            print(proc.stderr.strip(), file=sys.stderr, flush=True)
        raise UserError(f"{' '.join(cmd)} failed (exit {proc.returncode}; its output is above)")
    fields = dict(f.split("=", 1) for f in match.group(1).split())
    tokens, mb, seconds = int(fields["tokens"]), float(fields["MB"]), float(fields["seconds"])
    cpu_seconds = float(fields["cpu_seconds"])
    return dict(path=impl, workers=workers, documents=int(fields["documents"]), tokens=tokens, MB=mb,
                seconds=seconds, cpu_seconds=cpu_seconds, process_wall_seconds=round(wall, 3),
                process_cpu_seconds=round(cpu, 3), tokens_per_s=tokens / seconds, MB_per_s=mb / seconds,
                tokens_per_cpu_s=tokens / cpu_seconds)


def _shown(path):
    """A path as the results file records it: relative to the repository when inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def print_table(rows):
    print(f"{'path':<8}{'workers':>8}{'MB':>9}{'tokens':>12}{'seconds':>9}{'tokens/s':>12}{'MB/s':>8}"
          f"{'cpu s':>8}{'tokens/cpu-s':>14}")
    for r in rows:
        print(f"{r['path']:<8}{r['workers']:>8}{r['MB']:>9.2f}{r['tokens']:>12}{r['seconds']:>9.2f}"
              f"{r['tokens_per_s']:>12.0f}{r['MB_per_s']:>8.2f}{r['cpu_seconds']:>8.2f}"
              f"{r['tokens_per_cpu_s']:>14.0f}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args))


def run(args) -> int:
    if not os.path.isdir(args.data_dir):
        raise InputError(f"--data-dir {args.data_dir} does not exist; the benchmark needs the "
                         f"shared corpora (shared/data)")
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if not os.path.isfile(path):
            raise InputError(f"{flag} {path}: no such file")
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    full, small = os.path.join(work, "corpus.jsonl"), os.path.join(work, "slice.jsonl")
    make_jsonl(args.data_dir, full, args.size_mb)
    make_jsonl(args.data_dir, small, args.python_mb)

    load_before = os.getloadavg()
    rows = [run_preprocess(full, os.path.join(work, f"fast_w{w}"), "fast", w, args) for w in sorted(set(args.workers) | {1})]  # 1 worker: the baseline the speedup is taken against
    slice_fast = run_preprocess(small, os.path.join(work, "slice_fast"), "fast", 1, args)
    rows.append(run_preprocess(small, os.path.join(work, "slice_python"), "python", 1, args))
    load_after = os.getloadavg()
    same = all(filecmp.cmp(os.path.join(work, f"slice_fast_text_document{ext}"),
                           os.path.join(work, f"slice_python_text_document{ext}"), shallow=False)
               for ext in (".bin", ".idx"))

    print_table(rows)
    fast1 = next(r for r in rows if r["path"] == "fast" and r["workers"] == 1)
    python1 = rows[-1]
    # Speedup on the very same text, so that the mix of corpora cannot bias it.
    speedup = slice_fast["tokens_per_s"] / python1["tokens_per_s"]
    cpu_speedup = slice_fast["tokens_per_cpu_s"] / python1["tokens_per_cpu_s"]
    scaling = {r["workers"]: r["tokens_per_s"] / fast1["tokens_per_s"] for r in rows if r["path"] == "fast"}
    python1["extrapolated_seconds_for_full_corpus"] = fast1["tokens"] / python1["tokens_per_s"]
    print(f"python path ran on a {python1['MB']:.2f} MB slice; its tokens/s is measured there and "
          f"extrapolates to {python1['extrapolated_seconds_for_full_corpus']:.0f} s for the "
          f"{fast1['MB']:.1f} MB corpus (fast path on the same slice: {slice_fast['tokens_per_s']:.0f} "
          f"tokens/s; identical output: {same})")
    verdict = "ok" if speedup >= 5 else "NOT MET"
    print(f"fast/python speedup on 1 worker, same slice: {speedup:.1f}x (needs >= 5x: {verdict})")
    print(f"same, by CPU time (load-independent): {cpu_speedup:.1f}x")
    print("fast-path scaling vs 1 worker: " + ", ".join(f"{w} workers {s:.2f}x" for w, s in scaling.items()))
    print("(columns: seconds and cpu s exclude interpreter start-up and tokenizer loading; cpu s "
          "counts the pool workers too)")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")

    result = dict(rows=rows, slice_fast=slice_fast, python_matches_fast=same, speedup_fast_vs_python=speedup,
                  speedup_fast_vs_python_cpu=cpu_speedup,
                  worker_scaling=scaling, loadavg_before=load_before, loadavg_after=load_after,
                  cpu_count=os.cpu_count(), machine=platform.platform(), vocab_file=_shown(args.vocab_file),
                  merge_file=_shown(args.merge_file), size_mb=args.size_mb, python_slice_mb=args.python_mb)
    write_json_atomic(args.output, result, indent=2)
    print(f"wrote {args.output}")
    if args.work_dir is None:
        shutil.rmtree(work)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
