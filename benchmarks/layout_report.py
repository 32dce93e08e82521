"""The layout sweep's outputs: the sorted terminal table, CSV, JSON and the PNG chart.

Rows that ran are sorted by tokens/s (best first); failed, invalid and skipped rows follow with
their reasons. The chart (matplotlib, the ``plots`` extra; skipped with a note without it) shows
tokens/s per layout with the best marked, and each layout's estimated memory per rank, and its
measured peak, against the device limit.
"""
from __future__ import annotations

import csv
import os
from typing import List

from megatron_lite.io_utils import atomic_open, atomic_path, write_json_atomic

CSV_FIELDS = ["rank", "layout", "status", "reason", "tp", "pp", "dp", "mbs", "vp", "recompute", "sp", "zero",
              "attention", "num_microbatches", "tokens_per_s", "tflops_per_device", "mfu", "peak_tflops",
              "iter_time_s", "time_forward_backward_s", "time_pipeline_wait_s", "time_dp_comm_s", "time_optimizer_s",
              "peak_mem_gib", "mem_kind", "est_mem_gib", "est_activation_gib", "est_bubble", "wall_s"]


def sort_rows(rows: List[dict]) -> List[dict]:
    ran = sorted((r for r in rows if r.get("tokens_per_s")), key=lambda r: -r["tokens_per_s"])
    rest = [r for r in rows if not r.get("tokens_per_s")]
    for i, r in enumerate(ran, 1):
        r["rank"] = i
    return ran + rest


def _ms(v) -> str:
    return f"{1000 * v:7.1f}" if v is not None else "      -"


def print_table(rows: List[dict]) -> List[dict]:
    rows = sort_rows(rows)
    head = (f"{'#':>3} {'layout':<44} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU%':>5} {'peak GiB':>8} {'est GiB':>7} "
            f"{'bubble':>6} | {'fwd/bwd':>7} {'pipe':>7} {'DP':>7} {'optim':>7} ms")
    print(head)
    print("-" * len(head))
    for r in rows:
        left = f"{r.get('rank', '-'):>3} {r['layout']:<44} "
        est = f"{r['est_mem_gib']:7.2f} {r['est_bubble']:6.3f}" if "est_mem_gib" in r else f"{'-':>7} {'-':>6}"
        if not r.get("tokens_per_s"):
            print(left + f"{r['status']}: {r.get('reason', '')}"[:110])
            continue
        mfu = f"{100 * r['mfu']:5.1f}" if r.get("mfu") is not None else "    -"
        print(left + f"{r['tokens_per_s']:10.0f} {r['tflops_per_device']:8.3f} {mfu} {r['peak_mem_gib']:8.2f} {est} | "
              f"{_ms(r.get('time_forward_backward_s'))} {_ms(r.get('time_pipeline_wait_s'))} "
              f"{_ms(r.get('time_dp_comm_s'))} {_ms(r.get('time_optimizer_s'))}")
    kinds = sorted({r["mem_kind"] for r in rows if r.get("mem_kind")})
    if kinds:
        print(f"peak GiB: max over ranks ({', '.join(kinds)}); est GiB: model/memory.py's largest rank "
              "(weights + grads + optimizer + activations); bubble: (p-1)/(m v)")
    return rows


def write_outputs(rows: List[dict], meta: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path, png_path = (os.path.join(out_dir, f"layouts.{ext}") for ext in ("json", "csv", "png"))
    write_json_atomic(json_path, dict(meta, rows=rows))
    with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written = [json_path, csv_path]
    if write_chart(rows, meta, png_path):
        written.append(png_path)
    return written


def write_chart(rows: List[dict], meta: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plots]): no chart written")
        return False
    shown = [r for r in rows if "est_mem_gib" in r]
    if not shown:
        return False
    names = [r["layout"] for r in shown]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.5 * len(shown) + 2), 8), sharex=True)
    speeds = [r.get("tokens_per_s") or 0.0 for r in shown]
    colors = ["tab:green" if r.get("rank") == 1 else "tab:blue" if r.get("tokens_per_s") else "tab:gray"
              for r in shown]
    top.bar(range(len(shown)), speeds, color=colors)
    for i, r in enumerate(shown):
        if not r.get("tokens_per_s"):
            top.text(i, 0, r["status"], rotation=90, ha="center", va="bottom", fontsize=7)
        elif r.get("rank") == 1:
            top.annotate("best", (i, speeds[i]), ha="center", va="bottom", fontsize=8, color="tab:green")
    top.set_ylabel("tokens/s")
    top.set_title(f"{meta['world_size']} process(es) on {meta['device']}")
    bottom.bar(range(len(shown)), [r["est_mem_gib"] for r in shown], color="tab:orange", label="estimate")
    measured = [(i, r["peak_mem_gib"]) for i, r in enumerate(shown) if r.get("peak_mem_gib")]
    if measured:
        bottom.scatter(*zip(*measured), color="black", marker="x", zorder=3, label="measured peak (max over ranks)")
    bottom.axhline(meta["device_limit_gib"], color="tab:red", linestyle="--", label="device limit")
    bottom.set_ylabel("memory per rank (GiB)")
    bottom.legend(fontsize=7)
    bottom.set_xticks(range(len(shown)), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True
