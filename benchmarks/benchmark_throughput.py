#!/usr/bin/env python3
"""Single-device training throughput: tokens/s, TFLOP/s, MFU and peak memory of a full training step.

One step = forward + backward + optimizer step of megatron_lite's GPTModel with the project's
optimizer (megatron_lite.optim.optimizer.build_optimizer: AdamW, fp32 master weights for bf16/fp16;
the table names the optimizer class). FLOPs are the model's
analytic count (megatron_lite.model.flops, Megatron-LM's formula: matmuls only, backward = 2 x
forward), so TFLOP/s is model FLOP/s, and MFU = TFLOP/s / peak. Peak memory is the CUDA allocator's
max allocated on a GPU, the process's peak RSS on CPU. Times are medians of --iters steps.

The peak is --peak-tflops when given, else measured in this run: the best of 20 large matmuls in
the run's dtype (bf16 8192^3 on a GPU, 1024^3 on CPU), measured before and after the runs, the
higher kept (a peak read low while the device is busy would inflate MFU). A datasheet column (the
dense peak from ``megatron_lite.training.metrics.PEAK_TFLOPS``, e.g. H100 SXM 989 TFLOP/s bf16) is
printed when the GPU's name is recognised.

    # GPU: GPT-3 125M..1.3B at seq 1024 and 2048 in bf16
    python benchmarks/benchmark_throughput.py --output benchmarks/results/throughput_h100.json
    python benchmarks/benchmark_throughput.py --models 1.3B --seq-lengths 2048 --attention-backend fused_softmax
    # CPU: the tiny fp32 model
    OMP_NUM_THREADS=1 python benchmarks/benchmark_throughput.py --device cpu --output /tmp/throughput_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_lite.cli import run_main
from megatron_lite.config import ModelConfig, OptimizerConfig, pad_vocab_size
from megatron_lite.io_utils import write_json_atomic
from megatron_lite.model.flops import count_parameters, num_floating_point_operations
from megatron_lite.distributed.data_parallel import DDPConfig, DistributedDataParallel
from megatron_lite.optim.optimizer import build_optimizer as build_megatron_optimizer
from megatron_lite.parallel.state import ParallelState
from megatron_lite.training.metrics import device_peak_tflops, memory_stats, throughput

GPT2_VOCAB = 50257
# name: (layers, hidden, heads) -- GPT-3 paper, Table 2.1; "tiny" is the CPU smoke configuration.
MODELS = {"tiny": (2, 128, 4), "125M": (12, 768, 12), "350M": (24, 1024, 16), "760M": (24, 1536, 16),
          "1.3B": (24, 2048, 16)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tokens/s, TFLOP/s, MFU and peak memory of a GPT training step.")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="default: 125M 350M 760M 1.3B on cuda, tiny on cpu")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=None, help="default: 1024 2048 (cuda), 128 (cpu)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: 4")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--attention-backend", choices=["auto", "unfused", "fused_softmax", "sdpa"], default="auto")
    p.add_argument("--vocab-size", type=int, default=None, help=f"default: {GPT2_VOCAB} (GPT-2), 1024 for tiny")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU; measured with a large matmul when omitted")
    p.add_argument("--optimizer-impl", choices=["auto", "unfused"], default="auto",
                   help="auto: torch's fused AdamW on CUDA (the trainer's choice); unfused: the per-parameter loop, "
                        "for the fused-against-unfused comparison")
    p.add_argument("--output", default=None, help="JSON file for the results (written atomically)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    gpu = args.device == "cuda"
    args.models = args.models or (["125M", "350M", "760M", "1.3B"] if gpu else ["tiny"])
    args.seq_lengths = args.seq_lengths or ([1024, 2048] if gpu else [128])
    args.micro_batch_size = args.micro_batch_size or 4
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    for name in ("micro_batch_size", "warmup", "iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    if any(s < 1 for s in args.seq_lengths):
        p.error("--seq-lengths values must be >= 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    return args


def model_config(name: str, seq: int, args) -> ModelConfig:
    layers, hidden, heads = MODELS[name]
    vocab = args.vocab_size or (1024 if name == "tiny" else GPT2_VOCAB)
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=seq,
                      max_position_embeddings=seq, vocab_size=vocab, hidden_dropout=0.0, attention_dropout=0.0,
                      attention_backend=args.attention_backend, bf16=args.dtype == "bf16",
                      fp16=args.dtype == "fp16")
    cfg.padded_vocab_size = pad_vocab_size(vocab, cfg.make_vocab_size_divisible_by, 1)
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak_tflops(device, dtype) -> tuple:
    """(TFLOP/s, description): the best of 20 square matmuls in the run's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 5 if device.type == "cuda" else 1  # several per sync: one GPU matmul is too short to time alone
    best = float("inf")
    for _ in range(20):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n ** 3 / best / 1e12, f"measured: best {str(dtype).replace('torch.', '')} matmul {n}^3 on this device"


def datasheet_tflops(device) -> tuple:
    if device.type != "cuda":
        return None, None
    peak, source = device_peak_tflops(torch.cuda.get_device_name(device), "bf16")
    return (peak, source) if peak else (None, None)


def build_optimizer(model, cfg: ModelConfig, pstate, impl: str = "auto"):
    """(optimizer step callable, zero_grad callable, description). ``model`` is DDP-wrapped: gradients
    accumulate in its fp32 buffer, as in the trainer."""
    optim_cfg = OptimizerConfig(lr=1e-4, weight_decay=0.01, clip_grad=1.0)
    opt = build_megatron_optimizer([model], optim_cfg, cfg, pstate, fused=None if impl == "auto" else False)

    def zero_grad():
        model.zero_grad_buffer()
        opt.zero_grad()

    def step():
        model.finish_grad_sync()
        return opt.step()
    return step, zero_grad, f"megatron_lite.optim {type(opt).__name__}: {opt.implementation}, clip {optim_cfg.clip_grad}"


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> tuple:
    """(GiB, what it is): CUDA max allocated by tensors, or on CPU the process's peak RSS."""
    stats = memory_stats(device)
    if device.type == "cuda":
        return stats["mem_max_allocated_gib"], "cuda max_memory_allocated"
    return stats["mem_max_rss_gib"], "process peak RSS (whole process, never decreases)"


def run_case(name: str, seq: int, args, device, pstate) -> dict:
    from megatron_lite.model.gpt import GPTModel
    cfg = model_config(name, seq, args)
    row = {"model": name, "seq_length": seq, "micro_batch_size": args.micro_batch_size, "dtype": args.dtype,
           "params": count_parameters(cfg)}
    peak_memory_reset(device)
    model = opt_step = None
    try:
        model = GPTModel(cfg, pstate=pstate, seed=1234)
        row["attention_backend"] = model.attention_backend
        model = DistributedDataParallel(model.to(device), pstate, DDPConfig())
        opt_step, zero_grad, row["optimizer"] = build_optimizer(model, cfg, pstate, args.optimizer_impl)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, seq + 1), generator=g).to(device)
        ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        pos = torch.arange(seq, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)

        def step():
            zero_grad()
            loss = model(ids, pos, None, labels=labels).mean()
            loss.backward()
            opt_step()
            return loss

        for _ in range(args.warmup):
            step()
        times, losses = [], []
        for _ in range(args.iters):
            sync(device)
            t = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    except torch.cuda.OutOfMemoryError:
        model = opt_step = zero_grad = None  # free the model and optimizer state before the empty_cache
        torch.cuda.empty_cache()
        row["error"] = "OOM"
        return row
    step_s = statistics.median(times)
    flops = num_floating_point_operations(cfg, args.micro_batch_size)
    rates = throughput(step_s, args.micro_batch_size, seq, flops, world_size=1)
    row.update(step_time_s=step_s, tokens_per_s=rates["tokens_per_s"], tflops_per_device=rates["tflops_per_device"],
               flops_per_step=flops, first_loss=losses[0], last_loss=losses[-1])
    row["peak_memory_gib"], row["peak_memory_kind"] = peak_memory_gib(device)
    return row


def print_table(rows, peak, peak_src, sheet, sheet_src, device_name):
    print(f"device: {device_name}")
    print(f"MFU peak: {peak:.4g} TFLOP/s ({peak_src})")
    if sheet:
        print(f"datasheet: {sheet:.0f} TFLOP/s ({sheet_src})")
    opts = sorted({r["optimizer"] for r in rows if "optimizer" in r})
    print(f"optimizer: {'; '.join(opts) if opts else '-'}")
    head = (f"{'model':>5} {'params':>7} {'seq':>5} {'mbs':>3} {'attn':>13} | {'step s':>8} {'tokens/s':>9} "
            f"{'TFLOP/s':>8} {'MFU %':>6}" + (f" {'MFU% sheet':>10}" if sheet else "") + f" {'peak GiB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        left = (f"{r['model']:>5} {r['params'] / 1e6:6.1f}M {r['seq_length']:5d} {r['micro_batch_size']:3d} "
                f"{r.get('attention_backend', '-'):>13} | ")
        if "error" in r:
            print(left + r["error"])
            continue
        line = (left + f"{r['step_time_s']:8.4f} {r['tokens_per_s']:9.0f} {r['tflops_per_device']:8.3f} "
                f"{r['mfu_pct']:6.1f}")
        if sheet:
            line += f" {r['mfu_datasheet_pct']:10.1f}"
        print(line + f" {r['peak_memory_gib']:8.2f}")
    kinds = sorted({r["peak_memory_kind"] for r in rows if "peak_memory_kind" in r})
    if kinds:
        print(f"peak memory: {', '.join(kinds)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: run(args))


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: what training on the GPU would use
        pstate = ParallelState(backend="nccl")  # .device -> the current GPU; TP = PP = DP = 1 needs no group
        device = pstate.device
        device_name = torch.cuda.get_device_name(device)
    else:
        pstate = ParallelState()
        device_name = f"CPU ({torch.get_num_threads()} torch threads)"
    if args.peak_tflops is None:
        peak, peak_src = measured_peak_tflops(device, DTYPES[args.dtype])
    sheet, sheet_src = datasheet_tflops(device)

    rows = []
    for name in args.models:
        for seq in args.seq_lengths:
            row = run_case(name, seq, args, device, pstate)
            rows.append(row)
            print(f"  {name} seq {seq}: " + (row["error"] if "error" in row else
                                              f"{row['tokens_per_s']:.0f} tokens/s"), flush=True)
    if args.peak_tflops is not None:
        peak, peak_src = args.peak_tflops, "--peak-tflops"
    else:
        # Measured again after the runs, keeping the higher: a device busy with other work (a
        # shared CPU, a GPU still clocking up) reads low once, and a low peak inflates MFU.
        again, _ = measured_peak_tflops(device, DTYPES[args.dtype])
        peak, peak_src = max(peak, again), peak_src + ", best of before and after the runs"
    for row in rows:
        if "tflops_per_device" in row:
            row["mfu_pct"] = 100.0 * row["tflops_per_device"] / peak
            if sheet:
                row["mfu_datasheet_pct"] = 100.0 * row["tflops_per_device"] / sheet
    print_table(rows, peak, peak_src, sheet, sheet_src, device_name)
    if any(row.get("mfu_pct", 0) > 100 for row in rows):
        print("warning: MFU above 100%: the measured peak is too low (device shared or throttled while "
              "measuring); pass --peak-tflops", file=sys.stderr)
    if args.output:
        result = {"device": device_name, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "peak_tflops": peak, "peak_source": peak_src, "datasheet_tflops": sheet,
                  "datasheet_source": sheet_src, "args": vars(args), "rows": rows}
        write_json_atomic(args.output, result, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
