#!/usr/bin/env python3
"""Throughput per parallelism layout, with the memory and bubble estimates beside each measurement.

For a model and a process count, every valid layout (TP x PP x DP, micro-batch size, virtual
stages, recompute, sequence parallelism, ZeRO-1, attention backend), or the subset named, runs in a
fresh ``torchrun`` through the real trainer (``--mock-data``): ``--warmup-iters`` untimed iterations,
then ``--iters`` timed ones (medians reported). Per layout: tokens/s, TFLOP/s per device, MFU, peak
memory per rank (max over ranks), the trainer's step-time breakdown (forward/backward compute,
pipeline wait, DP communication, optimizer), and beside them ``model/memory.py``'s estimate of the
largest rank's memory and the bubble (p-1)/(m v). A layout that fails, runs out of memory or times
out is a row with its reason; the sweep goes on. Writes a sorted table, CSV, JSON and (with
matplotlib) a PNG chart under ``--output-dir``.

    python benchmarks/benchmark_layouts.py --nproc-per-node 8 --model 1.3B --tp 1,2,4 --pp 1,2 --mbs 1,2,4
    python benchmarks/benchmark_layouts.py --nproc-per-node 2 --model tiny --layouts tp2pp1dp1mbs2+sp,tp1pp2dp1mbs1+vp2
    # several nodes (shared --output-dir; run on every node): add torchrun's rendezvous flags
    python benchmarks/benchmark_layouts.py --nproc-per-node 8 --nnodes 2 --rdzv-endpoint node0:29500 --rdzv-id sweep1 ...

A layout spec is ``tp<T>pp<P>dp<D>mbs<B>`` plus options ``+vp<V>`` (V model chunks per stage:
interleaved 1F1B), ``+sp``, ``+zero``, ``+selective`` / ``+full`` (recompute), ``+unfused`` /
``+fused_softmax`` / ``+sdpa`` (attention backend). Flags after ``--`` go to every run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_throughput import GPT2_VOCAB, MODELS  # noqa: E402  (the model presets live there)
from layout_report import print_table, write_outputs  # noqa: E402

from megatron_lite.cli import first_line, run_main  # noqa: E402
from megatron_lite.config import parse_args as parse_trainer_args, validate  # noqa: E402
from megatron_lite.errors import InputError, UserError  # noqa: E402
from megatron_lite.model.memory import estimate_memory  # noqa: E402
from megatron_lite.parallel.state import free_port  # noqa: E402
from megatron_lite.training.metrics import resolve_peak_tflops  # noqa: E402

SPEC = re.compile(r"^tp(\d+)pp(\d+)dp(\d+)mbs(\d+)((?:\+[a-z0-9_]+)*)$")
BACKENDS = ("sdpa", "fused_softmax", "unfused")
OOM_MARKERS = ("out of memory", "OutOfMemoryError", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    mbs: int
    vp: int = 1  # model chunks per pipeline stage (interleaved 1F1B when > 1)
    recompute: str = "none"  # none | selective | full
    sp: bool = False
    zero: bool = False
    attention: str = "sdpa"

    @property
    def name(self) -> str:
        tags = [f"vp{self.vp}"] if self.vp > 1 else []
        tags += ["sp"] * self.sp + ["zero"] * self.zero + ([self.recompute] if self.recompute != "none" else [])
        return f"tp{self.tp}pp{self.pp}dp{self.dp}mbs{self.mbs}" + "".join("+" + t for t in tags + [self.attention])

    def flags(self, num_layers: int) -> List[str]:
        out = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
               "--micro-batch-size", str(self.mbs), "--attention-backend", self.attention]
        if self.vp > 1:
            out += ["--num-layers-per-virtual-pipeline-stage", str(max(1, num_layers // (self.pp * self.vp)))]
        if self.sp:
            out.append("--sequence-parallel")
        if self.zero:
            out.append("--use-distributed-optimizer")
        if self.recompute == "selective":
            out += ["--recompute-granularity", "selective"]
        elif self.recompute == "full":
            out += ["--recompute-granularity", "full", "--recompute-method", "uniform"]
        return out


def parse_spec(spec: str, attention: str) -> Layout:
    m = SPEC.match(spec)
    if not m:
        raise InputError(f"--layouts: {spec!r} is not a layout; write tp<T>pp<P>dp<D>mbs<B> with options "
                         "+vp<V> +sp +zero +selective +full +unfused +fused_softmax +sdpa, e.g. tp2pp1dp1mbs4+sp")
    tp, pp, dp, mbs = map(int, m.groups()[:4])
    fields = dict(tp=tp, pp=pp, dp=dp, mbs=mbs, attention=attention)
    for opt in filter(None, m.group(5).split("+")):
        if re.fullmatch(r"vp\d+", opt):
            fields["vp"] = int(opt[2:])
        elif opt in ("sp", "zero"):
            fields[opt] = True
        elif opt in ("selective", "full"):
            fields["recompute"] = opt
        elif opt in BACKENDS:
            fields["attention"] = opt
        else:
            raise InputError(f"--layouts: unknown option +{opt} in {spec!r}; choose from +vp<V> +sp +zero "
                             "+selective +full +unfused +fused_softmax +sdpa")
    return Layout(**fields)


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1")
    return values


def _choices(allowed):
    def parse(text: str) -> List[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return values
    return parse


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Throughput, MFU and memory per parallelism layout (torchrun sweep).")
    g = p.add_argument_group("processes (passed to torchrun)")
    g.add_argument("--nproc-per-node", type=int, required=True)
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=None, help="static rendezvous: this node's rank")
    g.add_argument("--master-addr", default=None)
    g.add_argument("--master-port", type=int, default=None)
    g.add_argument("--rdzv-endpoint", default=None, help="c10d rendezvous HOST:PORT (several nodes)")
    g.add_argument("--rdzv-id", default="layout-sweep", help="c10d rendezvous id; each layout appends its index")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default="tiny")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--seq-length", type=int, default=None, help="default 2048 on CUDA, 64 on CPU")
    g.add_argument("--vocab-size", type=int, default=None, help=f"default {GPT2_VOCAB}, 1024 for tiny")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    g.add_argument("--global-batch-size", type=int, default=None, help="default 2 x world size x max(--mbs)")
    g = p.add_argument_group("layouts (each a comma-separated list; default: every valid value)")
    g.add_argument("--layouts", default=None, help="explicit specs instead of the product, e.g. tp2pp1dp1mbs2+sp")
    g.add_argument("--tp", type=_ints)
    g.add_argument("--pp", type=_ints)
    g.add_argument("--mbs", type=_ints, default=[1, 2, 4])
    g.add_argument("--vp", type=_ints, default=[1, 2], help="model chunks per pipeline stage (PP > 1)")
    g.add_argument("--recompute", type=_choices(["none", "selective", "full"]), default=["none", "selective", "full"])
    g.add_argument("--sp", type=_choices(["off", "on"]), default=["off", "on"], help="sequence parallelism (TP > 1)")
    g.add_argument("--zero", type=_choices(["off", "on"]), default=["off", "on"], help="ZeRO-1 (DP > 1)")
    g.add_argument("--attention-backend", type=_choices(BACKENDS), default=["sdpa"])
    g = p.add_argument_group("runs")
    g.add_argument("--warmup-iters", type=int, default=2)
    g.add_argument("--iters", type=int, default=5, help="timed iterations (medians reported)")
    g.add_argument("--timeout-per-layout", type=float, default=600.0, help="seconds before a run is stopped")
    g.add_argument("--time-budget-s", type=float, default=None,
                   help="start no layout after this many seconds (one node only); the rest are rows 'not run'")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the device table)")
    g.add_argument("--output-dir", default="benchmarks/results/layouts")
    g.add_argument("--list", action="store_true", help="print the layouts and their estimates; run nothing")
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    args.world_size = args.nproc_per_node * args.nnodes
    cuda = torch.cuda.is_available()
    layers, hidden, heads = MODELS[args.model]
    args.num_layers = args.num_layers or layers
    args.hidden_size = args.hidden_size or hidden
    args.num_attention_heads = args.num_attention_heads or heads
    args.seq_length = args.seq_length or (2048 if cuda else 64)
    args.vocab_size = args.vocab_size or (1024 if args.model == "tiny" else GPT2_VOCAB)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.global_batch_size = args.global_batch_size or 2 * args.world_size * max(args.mbs)
    for name, low in (("nproc_per_node", 1), ("nnodes", 1), ("warmup_iters", 0), ("iters", 1)):
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}")
    if args.nnodes > 1 and args.time_budget_s is not None:
        raise InputError("--time-budget-s would let the nodes disagree on which layouts run; use it on one node")
    if args.nnodes > 1 and not (args.rdzv_endpoint or (args.master_addr and args.node_rank is not None)):
        raise InputError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, or --master-addr and --node-rank")
    return args


def model_flags(args) -> List[str]:
    precision = {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}[args.precision]
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
            "--max-position-embeddings", str(args.seq_length), "--vocab-size", str(args.vocab_size), "--mock-data",
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.warmup_iters + args.iters),
            "--log-interval", "1", "--eval-iters", "0", "--lr", "1e-4", "--hidden-dropout", "0",
            "--attention-dropout", "0", *precision, *args.extra]


def candidate_layouts(args) -> List[Layout]:
    if args.layouts:
        return [parse_spec(s, args.attention_backend[0]) for s in args.layouts.split(",") if s]
    out = []
    w = args.world_size
    for tp in args.tp or _divisors(w):
        for pp in args.pp or _divisors(w // tp if w % tp == 0 else 1):
            if w % (tp * pp):
                continue
            dp = w // (tp * pp)
            for mbs, vp, rc, sp, zero, attn in itertools.product(args.mbs, args.vp if pp > 1 else [1],
                                                                 args.recompute, args.sp if tp > 1 else ["off"],
                                                                 args.zero if dp > 1 else ["off"],
                                                                 args.attention_backend):
                out.append(Layout(tp, pp, dp, mbs, vp, rc, sp == "on", zero == "on", attn))
    return list(dict.fromkeys(out))


def check_layout(layout: Layout, args):
    """(validated Config, None) or (None, the error line)."""
    if layout.tp * layout.pp * layout.dp != args.world_size:
        return None, (f"TP x PP x DP = {layout.tp * layout.pp * layout.dp} but the sweep runs {args.world_size} "
                      "processes")
    try:
        cfg = parse_trainer_args(model_flags(args) + layout.flags(args.num_layers))
        validate(cfg, args.world_size)
        if layout.vp > 1 and (cfg.virtual_pipeline_size() or 1) != layout.vp:
            return None, f"{args.num_layers} layers cannot be cut into {layout.pp} stages x {layout.vp} chunks"
    except UserError as e:
        return None, first_line(e)
    except SystemExit:
        return None, "the trainer's parser refused the flags (see its message above)"
    return cfg, None


def estimate_row(cfg, device_type: str) -> dict:
    est = estimate_memory(cfg, device_type)
    big = max(est.ranks, key=lambda r: r.total_bytes)
    return {"est_mem_gib": est.max_total_bytes / 2 ** 30, "est_activation_gib": big.activation_bytes / 2 ** 30,
            "est_bubble": est.bubble_fraction, "num_microbatches": est.num_microbatches}


def torchrun_command(args, index: int, metrics: str, flags: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node),
           "--nnodes", str(args.nnodes)]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", f"{args.rdzv_id}-{index}"]
    else:
        cmd += ["--master-addr", args.master_addr or "127.0.0.1",
                "--master-port", str(args.master_port or free_port()), "--node-rank", str(args.node_rank or 0)]
    return cmd + ["-m", "megatron_lite.pretrain_gpt", *flags, "--metrics-jsonl", metrics]


def failure_reason(output: str, returncode: int) -> str:
    """One line saying why a run failed: out of memory, the trainer's error line, or the exception."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if any(marker in output for marker in OOM_MARKERS):
        hit = next(ln for ln in lines if any(m in ln for m in OOM_MARKERS))
        return "out of memory: " + hit[:160]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[0][:200]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (raised[-1][:200] if raised else f"exit status {returncode}")


def run_layout(layout: Layout, cfg, args, index: int) -> dict:
    run_dir = os.path.join(args.output_dir, "runs", layout.name)
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # the trainer appends; a rerun must not read the last sweep's lines
    cmd = torchrun_command(args, index, metrics, model_flags(args) + layout.flags(args.num_layers))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout stops every rank
    try:
        output, _ = proc.communicate(timeout=args.timeout_per_layout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        proc.returncode = None
    with open(os.path.join(run_dir, "log.txt"), "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n" + output)
    row = {"wall_s": time.time() - started}
    if proc.returncode is None:
        return dict(row, status="failed", reason=f"timed out after {args.timeout_per_layout:g} s (--timeout-per-layout)")
    if proc.returncode != 0:
        return dict(row, status="failed", reason=failure_reason(output, proc.returncode))
    if args.nnodes > 1 and not os.path.exists(metrics):
        return dict(row, status="ok", reason="metrics written on another node")
    return dict(row, **summarise_metrics(metrics, args.warmup_iters))


def summarise_metrics(path: str, warmup: int) -> dict:
    """Medians over the timed iterations of a run's --metrics-jsonl."""
    with open(path, encoding="utf-8") as f:
        recs = [r for r in map(json.loads, f) if "split" not in r]
    timed = [r for r in recs if r["iteration"] > warmup] or recs
    if not timed:
        return {"status": "failed", "reason": "the run logged no training iteration"}

    def med(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    memory = [r.get("mem_peak_max_over_ranks_gib") or r.get("mem_max_allocated_gib") or r.get("mem_max_rss_gib")
              for r in recs]
    # Every rate from the median step time, so that they agree with each other (rate x time is constant).
    step = med("iter_time_s")
    last = timed[-1]
    tflops = last["tflops_per_device"] * last["iter_time_s"] / step
    peak = last.get("peak_tflops")
    return {"status": "ok", "iter_time_s": step, "tokens_per_s": last["tokens_per_s"] * last["iter_time_s"] / step,
            "tflops_per_device": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak,
            "peak_mem_gib": max(m for m in memory if m is not None) if any(memory) else None,
            "mem_kind": "cuda max allocated" if "mem_max_allocated_gib" in recs[-1] else "peak RSS",
            **{k: med(k) for k in ("time_forward_backward_s", "time_pipeline_wait_s", "time_dp_comm_s",
                                  "time_optimizer_s")}}


def device_limit_gib(args) -> tuple:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 2 ** 30, props.name
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / args.nproc_per_node / 2 ** 30, f"CPU ({os.cpu_count()} cores; RAM / {args.nproc_per_node} ranks)"


def run(args) -> int:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    limit_gib, device = device_limit_gib(args)
    peak, peak_source = resolve_peak_tflops(args.peak_tflops, torch.device(device_type), args.precision)
    if peak and "--peak-tflops" not in args.extra:
        args.extra += ["--peak-tflops", str(peak)]
    print(f"device: {device}; MFU peak: " + (f"{peak:g} TFLOP/s ({peak_source})" if peak else peak_source))
    rows, planned = [], []
    for layout in candidate_layouts(args):
        cfg, reason = check_layout(layout, args)
        if cfg is None:
            if args.layouts:  # named by the user: say why it cannot run
                rows.append(dict(asdict(layout), layout=layout.name, status="invalid", reason=reason))
            continue
        planned.append((layout, cfg))
    print(f"{len(planned)} layout(s) to run on {args.world_size} process(es) ({args.nnodes} node(s)); model "
          f"{args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, seq "
          f"{args.seq_length}, vocab {args.vocab_size}, {args.precision}, global batch {args.global_batch_size}",
          flush=True)
    started = time.time()
    for k, (layout, cfg) in enumerate(planned):
        row = dict(asdict(layout), layout=layout.name, **estimate_row(cfg, device_type))
        elapsed = time.time() - started
        eta = elapsed / k * (len(planned) - k) if k else None
        if args.list:
            rows.append(dict(row, status="listed", reason=f"estimate {row['est_mem_gib']:.2f} GiB of {limit_gib:.0f}, "
                                                             f"activations {row['est_activation_gib']:.2f} GiB, "
                                                             f"bubble {row['est_bubble']:.3f}"))
            continue
        if args.time_budget_s is not None and elapsed + (elapsed / k if k else 0) > args.time_budget_s:
            rows.append(dict(row, status="not run", reason=f"time budget {args.time_budget_s:g} s (--time-budget-s)"))
            continue
        print(f"[{k + 1}/{len(planned)}] {layout.name}  elapsed {elapsed:.0f} s"
              + (f", ETA {eta:.0f} s" if eta is not None else ""), flush=True)
        row.update(run_layout(layout, cfg, args, k))
        print("    " + (f"{row['tokens_per_s']:.0f} tokens/s, peak {row['peak_mem_gib']:.2f} GiB "
                        f"(estimate {row['est_mem_gib']:.2f})" if row.get("tokens_per_s") else
                        f"{row['status']}: {row.get('reason', '')}"), flush=True)
        rows.append(row)
    meta = {"device": device, "device_limit_gib": limit_gib, "peak_tflops": peak, "peak_source": peak_source,
            "world_size": args.world_size, "nnodes": args.nnodes, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__, "sweep_s": time.time() - started,
            "args": {k: v for k, v in vars(args).items()}}
    rows = print_table(rows)
    if args.list:
        print(f"dry run (--list): {len(planned)} layout(s) valid at world size {args.world_size}; nothing run")
    elif args.node_rank in (None, 0):
        for path in write_outputs(rows, meta, args.output_dir):
            print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), usage_status=2)


if __name__ == "__main__":
    sys.exit(main())
