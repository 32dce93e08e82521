"""Step time of the pipeline schedules against the bubble they are predicted to have.

    python benchmarks/benchmark_pipeline.py --output benchmarks/results/pipeline.json

For each --pp size, spawns that many CPU gloo ranks (one thread each) and, for 1F1B and
interleaved 1F1B (2 virtual stages), times forward+backward of a small GPT over m = PP, 2PP,
4PP, 8PP micro-batches. Beside each measured step time it prints the predicted bubble
fraction (p - 1) / (m * v) and compares time per micro-batch, normalised to the largest m,
with what that bubble predicts: (1 + bubble(m)) / (1 + bubble(m_max)). It also measures, per
stage, the share of the step spent blocked in p2p transfers (bubble plus transfer time; mean over
stages), beside the idle share the bubble predicts: bubble / (1 + bubble). Each point is the
fastest of --iters steps; the schedules take turns within each iteration.

Caveat on CPU: a stage blocked in a receive gives its core back, so when ranks outnumber free
cores the bubble is partly filled by other stages' work and measured ratios sit below the
prediction; p2p latency (not modelled) weighs more with interleaving. Numbers are noisy on a
shared machine; report the core count with them (the JSON does).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from megatron_lite.cli import run_main
from megatron_lite.errors import UserError
from megatron_lite.io_utils import write_json_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline sizes (ranks per run)")
    p.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8], help="m = multiplier x PP")
    p.add_argument("--schedules", nargs="+", choices=["gpipe", "1f1b", "interleaved"],
                   default=["1f1b", "interleaved"])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5, help="timed steps per point (the fastest is reported)")
    p.add_argument("--warmup-iters", type=int, default=1)
    p.add_argument("--output", default=None, help="JSON results file (written atomically)")
    args = p.parse_args(argv)
    for pp in args.pp:
        if pp < 2:
            p.error(f"--pp {pp}: a pipeline needs at least 2 stages")
        need = pp * (2 if "interleaved" in args.schedules else 1)
        if args.num_layers % need:
            p.error(f"--num-layers ({args.num_layers}) must be divisible by {need} "
                    f"(--pp {pp}{' x 2 virtual stages' if need != pp else ''})")
    if any(m < 1 for m in args.multipliers) or args.iters < 1 or args.warmup_iters < 0:
        p.error("--multipliers and --iters must be >= 1, --warmup-iters >= 0")
    if args.hidden_size % args.num_attention_heads:
        p.error("--hidden-size must be divisible by --num-attention-heads")
    return args


def _config(args, pp: int, schedule: str):
    from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig
    vp = 2 if schedule == "interleaved" else None
    model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                        vocab_size=args.vocab_size, padded_vocab_size=args.vocab_size,
                        hidden_dropout=0.0, attention_dropout=0.0)
    par = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule=schedule,
                         num_layers_per_virtual_pipeline_stage=args.num_layers // (pp * vp) if vp else None)
    return Config(model=model, parallel=par, train=TrainConfig(micro_batch_size=args.micro_batch_size)), vp


def _rank_main(rank: int, pp: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(pp))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.parallel.schedules import ScheduleStats, get_forward_backward_func
    from megatron_lite.parallel.state import destroy_parallel, initialize_parallel
    from megatron_lite.training.batch import samples_to_batch
    from megatron_lite.pretrain_gpt import forward_step

    ps = initialize_parallel(pipeline=pp, backend="gloo")
    runs = {}
    for schedule in args.schedules:
        cfg, vp = _config(args, pp, schedule)
        ps.virtual_pp_size = vp
        model_parallel_seed(1234, ps)
        runs[schedule] = (cfg, vp, build_model_chunks(cfg, ps), get_forward_backward_func(cfg))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for mult in args.multipliers:
        m = mult * pp
        batches = [samples_to_batch(torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                                                  generator=gen), 0, runs[args.schedules[0]][0].model,
                                    torch.device("cpu")) for _ in range(m)]
        times = {s: [] for s in args.schedules}
        idle = {s: [] for s in args.schedules}
        # Schedules take turns within each iteration, so load changes on a shared machine hit all alike.
        for it in range(args.warmup_iters + args.iters):
            for schedule, (cfg, vp, chunks, fb) in runs.items():
                ps.virtual_pp_size = vp
                for c in chunks:
                    c.zero_grad(set_to_none=True)
                iters = [iter(batches) for _ in chunks]
                stats = ScheduleStats(track_memory=False)
                dist.barrier()
                start = time.perf_counter()
                fb(forward_step_func=forward_step, data_iterator=iters if vp else iters[0], model=chunks,
                   num_microbatches=m, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                   hidden_size=args.hidden_size, pstate=ps, stats=stats)
                dist.barrier()  # the step ends when the slowest stage ends
                elapsed = time.perf_counter() - start
                # Mean over stages of the share of the step spent blocked in p2p (bubble + transfer).
                share = torch.tensor([stats.p2p_seconds / elapsed], dtype=torch.float64)
                dist.all_reduce(share)
                if it >= args.warmup_iters:
                    times[schedule].append(elapsed)
                    idle[schedule].append(share.item() / pp)
        for schedule, (cfg, vp, _, _) in runs.items():
            # min: noise from other processes only ever adds time
            best = min(range(len(times[schedule])), key=times[schedule].__getitem__)
            rows.append(dict(pp=pp, schedule=schedule, vp=vp or 1, m=m, step_times_s=times[schedule],
                             step_time_s=times[schedule][best], p2p_blocked_fraction=idle[schedule][best],
                             median_step_time_s=statistics.median(times[schedule])))
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(rows, f)
    destroy_parallel()


def _add_predictions(rows):
    from megatron_lite.parallel.schedule_orders import bubble_fraction
    for r in rows:
        r["predicted_bubble_fraction"] = bubble_fraction(r["pp"], r["m"], r["vp"])
        # A stage idles (p-1) slots out of m*v + p-1: bubble / (1 + bubble) of the step.
        r["predicted_idle_fraction"] = r["predicted_bubble_fraction"] / (1 + r["predicted_bubble_fraction"])
        r["time_per_microbatch_s"] = r["step_time_s"] / r["m"]
    for r in rows:
        ref = max((x for x in rows if x["pp"] == r["pp"] and x["schedule"] == r["schedule"]), key=lambda x: x["m"])
        r["measured_relative_time_per_mb"] = r["time_per_microbatch_s"] / ref["time_per_microbatch_s"]
        r["predicted_relative_time_per_mb"] = ((1 + r["predicted_bubble_fraction"])
                                               / (1 + ref["predicted_bubble_fraction"]))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: run(args, argv))


def run(args, argv=None) -> int:
    from megatron_lite.parallel.state import free_port
    rows = []
    load_before = os.getloadavg()[0]
    for pp in args.pp:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        try:
            mp.spawn(_rank_main, args=(pp, free_port(), args, path), nprocs=pp, join=True)
            with open(path) as f:
                rows += json.load(f)
        except mp.ProcessRaisedException as e:
            last = str(e).strip().splitlines()[-1]
            raise UserError(f"a rank failed in the PP={pp} run: {last}") from None
        finally:
            os.unlink(path)
    _add_predictions(rows)
    print(f"{'PP':>3} {'schedule':>11} {'v':>2} {'m':>3} {'step s':>8} {'s/mb':>8} {'bubble':>7} "
          f"{'rel t/mb':>9} {'predicted':>9} {'p2p share':>9} {'predicted':>9}")
    for r in rows:
        print(f"{r['pp']:>3} {r['schedule']:>11} {r['vp']:>2} {r['m']:>3} {r['step_time_s']:>8.3f} "
              f"{r['time_per_microbatch_s']:>8.4f} {r['predicted_bubble_fraction']:>7.3f} "
              f"{r['measured_relative_time_per_mb']:>9.3f} {r['predicted_relative_time_per_mb']:>9.3f} "
              f"{r['p2p_blocked_fraction']:>9.3f} {r['predicted_idle_fraction']:>9.3f}")
    if args.output:
        given = sys.argv[1:] if argv is None else argv
        out = dict(command="python benchmarks/benchmark_pipeline.py " + " ".join(given),
                   backend="gloo", device="cpu", cpu_count=os.cpu_count(), threads_per_rank=1,
                   load_average_1m_before_after=[load_before, os.getloadavg()[0]],
                   torch=torch.__version__,
                   model=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                              num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                              micro_batch_size=args.micro_batch_size, vocab_size=args.vocab_size),
                   iters=args.iters, warmup_iters=args.warmup_iters, results=rows)
        write_json_atomic(args.output, out, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
