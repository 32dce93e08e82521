"""Timers, throughput (tokens/s, TFLOP/s per device, MFU), memory, and where they are written.

Throughput follows Megatron-LM: TFLOP/s per device = model FLOPs of one global batch (forward
+ backward, ``model.flops.num_floating_point_operations`` without activation recompute) / (seconds
per iteration x world size x 1e12). MFU is that over the device peak (printed once, so a wrong peak is
visible): --peak-tflops when given, else the dense (never sparsity) tensor-core peak of the CUDA device
from ``PEAK_TFLOPS`` below; an unknown device gets a warning and no MFU. The FLOPs the hardware really ran, recomputed forwards included,
are logged apart as ``hardware_tflops_per_device`` and ``hfu`` (hardware FLOPs utilisation), so MFU
stays comparable between runs with and without --recompute-granularity.

Only the logging rank (``pstate.is_logging_rank``) constructs a ``MetricsWriter``; it appends one
JSON object per line to --metrics-jsonl and flushes it, and mirrors the scalars to TensorBoard.
"""
from __future__ import annotations

import json
import math
import os
import resource
import re
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from megatron_lite.errors import OutputPathError


class Timer:
    """Wall-clock timer; synchronises CUDA so GPU work is counted where it ran."""

    def __init__(self):
        self.elapsed_s = 0.0
        self._start: Optional[float] = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        dt = time.perf_counter() - self._start
        self.elapsed_s += dt
        self._start = None
        return dt

    def reset(self) -> float:
        """Return the accumulated time and start accumulating afresh."""
        out, self.elapsed_s = self.elapsed_s, 0.0
        return out


# Dense peak TFLOP/s per device from the vendors' datasheets (the sparsity figures are twice these and
# never apply to training): (substring of torch.cuda.get_device_name, name, bf16/fp16, tf32 for fp32
# runs). Matched in order, so the more specific name comes first (H100 PCIe before H100, A100 before A10).
PEAK_TFLOPS = [
    ("GH200", "GH200", 989.4, 494.7),
    ("H200 NVL", "H200 NVL", 835.6, 417.8),
    ("H200", "H200 SXM", 989.4, 494.7),
    ("H100 NVL", "H100 NVL", 835.6, 417.8),
    ("H100 PCIe", "H100 PCIe", 756.5, 378.0),
    ("H100", "H100 SXM", 989.4, 494.7),
    ("H800", "H800 SXM", 989.4, 494.7),
    ("B200", "B200", 2250.0, 1100.0),
    ("A100", "A100", 312.0, 156.0),
    ("A800", "A800", 312.0, 156.0),
    ("A30", "A30", 165.0, 82.0),
    ("A10G", "A10G", None, None),  # not published; refuse rather than take the A10's figure below
    ("A10", "A10", 125.0, 62.5),
    ("L40S", "L40S", 362.1, 183.0),
    ("L40", "L40", 181.0, 90.5),
    ("L4", "L4", 121.0, 60.0),
    ("MI300X", "MI300X", 1307.4, 653.7),
]


def device_peak_tflops(device_name: str, dtype: str) -> Tuple[Optional[float], str]:
    """(peak, where it comes from) for a run in ``dtype`` ('bf16', 'fp16' or 'fp32'); (None, why) if unknown."""
    for key, name, half, tf32 in PEAK_TFLOPS:
        # a whole model name: "A100" is not in "RTX A1000", nor "H200" in "GH200"
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            if dtype == "fp32" and not torch.backends.cuda.matmul.allow_tf32:
                return None, (f"fp32 matmuls without TF32 on {device_name} (torch.backends.cuda.matmul."
                              "allow_tf32 is off): no table peak; pass --peak-tflops to report MFU")
            peak = tf32 if dtype == "fp32" else half
            if peak is None:
                break
            kind = "TF32" if dtype == "fp32" else "bf16/fp16"
            return peak, f"dense {kind} peak of {name} ({device_name}), from the table in training/metrics.py"
    return None, f"no peak TFLOP/s known for {device_name!r}"


def resolve_peak_tflops(given: Optional[float], device: torch.device, dtype: str) -> Tuple[Optional[float], str]:
    """--peak-tflops when given, else the CUDA device's table peak; (None, reason) on CPU or unknown devices."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: pass --peak-tflops to report MFU"
    return device_peak_tflops(torch.cuda.get_device_name(device), dtype)


class StepTimers:
    """Seconds per phase of the timed training steps since the last ``averages()``, taken between
    device synchronisations (so GPU work is counted in the phase that launched it). Only the steps
    begun with ``begin_step(timed=True)`` are timed (the trainer times one per log interval), so the
    other steps run without the synchronisations."""

    def __init__(self):
        self.totals: Dict[str, float] = defaultdict(float)
        self.timed = True
        self.timed_steps = 0

    def begin_step(self, timed: bool) -> None:
        self.timed = timed
        self.timed_steps += int(timed)

    @contextmanager
    def phase(self, name: str):
        if not self.timed:
            yield
            return
        Timer._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            Timer._sync()
            self.totals[name] += time.perf_counter() - start

    def move(self, seconds: float, source: str, target: str) -> None:
        """Count ``seconds`` of ``source``'s time as ``target``'s (time blocked inside a phase)."""
        if not self.timed:
            return
        self.totals[source] -= seconds
        self.totals[target] += seconds

    def averages(self) -> Dict[str, float]:
        """{"time_<phase>_s": seconds per timed step}, and start afresh."""
        out = {f"time_{k}_s": v / max(self.timed_steps, 1) for k, v in self.totals.items()}
        self.totals, self.timed_steps = defaultdict(float), 0
        return out


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA allocator max allocated, or the peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return int(memory_stats(device)["mem_max_rss_gib"] * 2 ** 30)


def throughput(iter_time_s: float, global_batch_size: int, seq_length: int, flops_per_batch: float,
               world_size: int, peak_tflops: Optional[float] = None,
               hardware_flops_per_batch: Optional[float] = None) -> Dict[str, Optional[float]]:
    """``flops_per_batch``: model FLOPs (no recompute); ``hardware_flops_per_batch``: with recompute
    (defaults to the model FLOPs, i.e. no recompute)."""
    if hardware_flops_per_batch is None:
        hardware_flops_per_batch = flops_per_batch
    tokens_per_s = global_batch_size * seq_length / iter_time_s
    tflops = flops_per_batch / (iter_time_s * world_size * 1e12)
    hardware_tflops = hardware_flops_per_batch / (iter_time_s * world_size * 1e12)
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "hardware_tflops_per_device": hardware_tflops,
            "hfu": hardware_tflops / peak_tflops if peak_tflops else None}


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return {"mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if sys.platform == "darwin":  # bytes there
        rss_kib /= 1024
    return {"mem_max_rss_gib": rss_kib / 2 ** 20}


def format_train_line(rec: dict, train_iters: int) -> str:
    """Megatron-LM's training log line, plus throughput."""
    parts = [f" iteration {rec['iteration']:8d}/{train_iters:8d}",
             f"consumed samples: {rec['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {rec['iter_time_s'] * 1000:.1f}",
             f"learning rate: {rec['lr']:.6E}",
             f"global batch size: {rec['global_batch_size']:5d}"]
    if rec.get("lm_loss") is not None:
        parts.append(f"lm loss: {rec['lm_loss']:.6E}")
    parts.append(f"loss scale: {rec['loss_scale']:.1f}")
    if rec.get("grad_norm") is not None:
        parts.append(f"grad norm: {rec['grad_norm']:.3f}")
    if rec.get("num_zeros") is not None:
        parts.append(f"num zeros: {rec['num_zeros']:.1f}")
    parts += [f"number of skipped iterations: {rec['skipped_iters']:3d}",
              f"number of nan iterations: {rec['nan_iters']:3d}",
              f"tokens/s: {rec['tokens_per_s']:.0f}",
              f"TFLOP/s/device: {rec['tflops_per_device']:.3f}"]
    if rec.get("mfu") is not None:
        parts.append(f"MFU: {100 * rec['mfu']:.2f}%")
    if rec.get("time_forward_backward_s") is not None:
        parts.append("step (ms): fwd/bwd {:.1f} pipeline wait {:.1f} DP comm {:.1f} optimizer {:.1f}".format(
            *(1000 * rec.get(f"time_{k}_s", 0.0) for k in ("forward_backward", "pipeline_wait", "dp_comm", "optimizer"))))
    if rec.get("iter_time_max_s") is not None:
        parts.append(f"step time over ranks (ms): min {rec['iter_time_min_s'] * 1000:.1f} max "
                     f"{rec['iter_time_max_s'] * 1000:.1f} (slowest rank {rec['slowest_rank']})")
    if rec.get("hardware_tflops_per_device") not in (None, rec["tflops_per_device"]):
        # Only differs with activation recompute; then show what the hardware really ran too.
        parts.append(f"hardware TFLOP/s/device: {rec['hardware_tflops_per_device']:.3f}")
        if rec.get("hfu") is not None:
            parts.append(f"HFU: {100 * rec['hfu']:.2f}%")
    return " | ".join(parts) + " |"


def format_eval_line(iteration: int, loss: float, ppl: float, split: str = "validation") -> str:
    text = f" {split} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    bar = "-" * (len(text) + 1)
    return f"{bar}\n{text}\n{bar}"


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))  # Megatron caps the exponent at 20 to stay finite


class MetricsWriter:
    """JSONL (flushed per line) and TensorBoard sinks; either may be absent."""

    def __init__(self, jsonl_path: Optional[str] = None, tensorboard_dir: Optional[str] = None):
        self._jsonl = None
        self._tb = None
        if jsonl_path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
                self._jsonl = open(jsonl_path, "a", encoding="utf-8")
            except OSError as e:
                raise OutputPathError(f"--metrics-jsonl: cannot open {jsonl_path} for writing "
                                      f"({e.strerror or e}); choose a writable path") from None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: import on use
            try:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)
            except OSError as e:
                self.close()
                raise OutputPathError(f"--tensorboard-dir: cannot write to {tensorboard_dir} "
                                      f"({e.strerror or e}); choose a writable directory") from None

    def write(self, record: dict, tb_prefix: str = "") -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, sort_keys=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(tb_prefix + key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
