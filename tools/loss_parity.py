"""Is my layout right? Train one tiny fp32 GPT under several TP x PP x DP layouts through the real
entry point (torchrun, gloo, CPU) and compare every iteration's loss and grad norm with the
single-process run.

    python tools/loss_parity.py --layouts tp2pp2dp2,tp1pp1dp8+zero+overlap
    python tools/loss_parity.py --all-up-to 8 --variants plain,overlap,zero,zero+overlap+gather
    python tools/loss_parity.py --layouts tp2pp1dp2+sp -- --num-layers 2 --hidden-size 128

A layout is ``tp{T}pp{P}dp{D}`` plus options: ``+zero`` (--use-distributed-optimizer), ``+overlap``
(--overlap-grad-reduce with small buckets), ``+gather`` (--overlap-param-gather), ``+sp``
(--sequence-parallel), ``+vpp`` (interleaved schedule, one layer per virtual stage), ``+recompute``
(full activation recompute). Flags after ``--`` go to every run (reference included). Dropout is off
and the seed fixed, so the curves must agree up to floating-point reduction order: the default
tolerance is 1e-5 relative. Prints a table, writes ``--json-out``, and exits 1 when a layout is
off by more than ``--tolerance`` (2 on bad input).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from megatron_lite.cli import EXIT_USAGE, run_main
from megatron_lite.errors import InputError
from megatron_lite.io_utils import atomic_write_text
from megatron_lite.parallel.state import free_port

LAYOUT = re.compile(r"^tp(\d+)pp(\d+)dp(\d+)((?:\+[a-z]+)*)$")
OPTIONS = {
    "zero": ["--use-distributed-optimizer"],
    "overlap": ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"],
    "gather": ["--overlap-param-gather"],
    "sp": ["--sequence-parallel"],
    "vpp": ["--num-layers-per-virtual-pipeline-stage", "1"],
    "recompute": ["--recompute-granularity", "full", "--recompute-method", "uniform"],
}
REFERENCE = "tp1pp1dp1"


def model_flags(train_iters: int, global_batch: int) -> List[str]:
    """A tiny model every layout up to TP=4, PP=4 can split (4 layers, 4 heads)."""
    return ["--mock-data", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
            "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--global-batch-size", str(global_batch), "--train-iters", str(train_iters),
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3", "--lr-decay-style", "cosine",
            "--min-lr", "1e-4", "--clip-grad", "0.5", "--weight-decay", "0.1", "--seed", "7",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", "--distributed-backend", "gloo"]


def parse_layout(spec: str) -> dict:
    m = LAYOUT.match(spec)
    if not m:
        raise InputError(f"--layouts: {spec!r} is not a layout; write tp<T>pp<P>dp<D>, optionally followed by "
                         f"+option ({', '.join(OPTIONS)}), e.g. tp2pp2dp2+zero")
    tp, pp, dp = (int(m.group(i)) for i in (1, 2, 3))
    if min(tp, pp, dp) < 1:
        raise InputError(f"--layouts: {spec!r}: every size must be >= 1")
    options = [o for o in m.group(4).split("+") if o]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise InputError(f"--layouts: {spec!r}: unknown option +{unknown[0]}; choose from {', '.join(OPTIONS)}")
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    for o in options:
        flags += OPTIONS[o]
    return {"layout": spec, "tp": tp, "pp": pp, "dp": dp, "world": tp * pp * dp, "flags": flags}


def all_layouts(up_to: int, variants: List[str]) -> List[str]:
    """Every (TP, PP, DP) of powers of two with TP x PP x DP <= up_to (TP, PP <= 4), times each variant."""
    sizes = [2 ** i for i in range(up_to.bit_length()) if 2 ** i <= up_to]
    out = []
    for tp, pp, dp in itertools.product(sizes, sizes, sizes):
        if tp * pp * dp > up_to or tp > 4 or pp > 4:
            continue  # the tiny model has 4 heads and 4 layers
        for v in variants:
            suffix = "" if v == "plain" else "+" + v
            out.append(f"tp{tp}pp{pp}dp{dp}{suffix}")
    return [spec for spec in out if spec != REFERENCE]


def run_layout(layout: dict, base: List[str], extra: List[str], workdir: str, timeout: float) -> dict:
    metrics = os.path.join(workdir, layout["layout"].replace("+", "_") + ".jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(layout["world"]),
           "--master-port", str(free_port()), "-m", "megatron_lite.pretrain_gpt"] + base + layout["flags"] + \
        extra + ["--metrics-jsonl", metrics]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**layout, "ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": time.time() - start}
    seconds = time.time() - start
    if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:") or "Error" in l]
        return {**layout, "ok": False, "seconds": seconds,
                "error": (errors[-1] if errors else proc.stderr.strip().splitlines()[-1:] or ["?"])[0][:300]}
    losses, norms = [], []
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "split" not in rec and rec.get("lm_loss") is not None:
                losses.append(rec["lm_loss"])
                norms.append(rec["grad_norm"])
    return {**layout, "ok": True, "seconds": seconds, "losses": losses, "grad_norms": norms}


def max_rel(a: List[float], b: List[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)), default=0.0)


def compare(run: dict, ref: dict, tolerance: float) -> dict:
    if not run["ok"]:
        return {**run, "passed": False, "max_rel_loss": None, "max_rel_grad_norm": None}
    rl, rg = max_rel(run["losses"], ref["losses"]), max_rel(run["grad_norms"], ref["grad_norms"])
    return {**run, "max_rel_loss": rl, "max_rel_grad_norm": rg, "passed": rl <= tolerance and rg <= tolerance}


def table_header(tolerance: float) -> str:
    return (f"{'layout':34s} {'ranks':>5s} {'iters':>5s} {'max rel dloss':>14s} {'max rel dgnorm':>14s} "
            f"{'time s':>7s}  result (tolerance {tolerance:g})")


def table_row(r: dict) -> str:
    if r.get("max_rel_loss") is None:
        return (f"{r['layout']:34s} {r['world']:5d} {'-':>5s} {'-':>14s} {'-':>14s} {r['seconds']:7.1f}  "
                f"FAIL: {r.get('error')}")
    return (f"{r['layout']:34s} {r['world']:5d} {len(r['losses']):5d} {r['max_rel_loss']:14.2e} "
            f"{r['max_rel_grad_norm']:14.2e} {r['seconds']:7.1f}  {'PASS' if r['passed'] else 'FAIL'}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--layouts", default=None, help="comma-separated layouts, e.g. tp2pp2dp2,tp1pp1dp8+zero")
    p.add_argument("--all-up-to", type=int, default=None, help="every power-of-two layout with <= N ranks")
    p.add_argument("--variants", default="plain", help="with --all-up-to: comma-separated option sets, "
                                                       "e.g. plain,overlap,zero,zero+overlap+gather")
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative difference (default 1e-5, fp32)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per layout")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    def body() -> int:
        if (args.layouts is None) == (args.all_up_to is None):
            raise InputError("give --layouts L1,L2,... or --all-up-to N (one of them)")
        if args.train_iters < 1:
            raise InputError("--train-iters must be >= 1")
        if args.all_up_to is not None:
            if args.all_up_to < 2:
                raise InputError("--all-up-to must be >= 2")
            specs = all_layouts(args.all_up_to, [v.strip() for v in args.variants.split(",") if v.strip()])
        else:
            specs = [s.strip() for s in args.layouts.split(",") if s.strip()]
        layouts = [parse_layout(s) for s in specs]
        for s in args.variants.split(","):
            if s.strip() and s.strip() != "plain":
                parse_layout("tp1pp1dp1+" + s.strip())  # checks the option names
        max_world = max(l["world"] for l in layouts)
        global_batch = max(8, max(l["dp"] for l in layouts))
        for l in layouts:
            if global_batch % l["dp"]:
                raise InputError(f"--layouts: {l['layout']}: DP={l['dp']} must divide the global batch "
                                 f"{global_batch}; use powers of two")
        base = model_flags(args.train_iters, global_batch)
        with tempfile.TemporaryDirectory(prefix="loss_parity_") as workdir:
            ref = run_layout(parse_layout(REFERENCE), base, extra, workdir, args.timeout)
            if not ref["ok"]:
                raise InputError(f"the single-process reference run failed: {ref['error']}")
            rows = []
            print(table_header(args.tolerance), flush=True)
            for layout in layouts:  # rows stream in as layouts finish
                row = compare(run_layout(layout, base, extra, workdir, args.timeout), ref, args.tolerance)
                rows.append(row)
                print(table_row(row), flush=True)
        passed = all(r["passed"] for r in rows)
        print(f"{sum(r['passed'] for r in rows)}/{len(rows)} layouts within {args.tolerance:g} of one process "
              f"(up to {max_world} ranks; reference losses {', '.join(f'{x:.6f}' for x in ref['losses'])})")
        if args.json_out:
            report = {"tolerance": args.tolerance, "train_iters": args.train_iters, "extra_flags": extra,
                      "reference": {k: ref[k] for k in ("losses", "grad_norms", "seconds")},
                      "runs": [{k: r.get(k) for k in ("layout", "tp", "pp", "dp", "world", "flags", "ok", "error",
                                                      "losses", "grad_norms", "max_rel_loss", "max_rel_grad_norm",
                                                      "passed", "seconds")} for r in rows]}
            atomic_write_text(args.json_out, json.dumps(report, indent=1) + "\n")
        return 0 if passed else 1

    return run_main(body, usage_status=EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
