"""benchmarks/benchmark_layouts.py run as a user would: a 2-process sweep of 3 layouts of a tiny model
through torchrun and the real trainer, plus one layout that cannot run; every row, the CSV, the JSON and
the PNG are checked. Also: a run that outlives --timeout-per-layout is stopped and becomes a row, the
failure classifier, and examples/benchmark_layouts.sh's DRY_RUN listing."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
TINY = ["--model", "tiny", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--vocab-size", "256", "--global-batch-size", "8"]
STEP_KEYS = ("time_forward_backward_s", "time_pipeline_wait_s", "time_dp_comm_s", "time_optimizer_s")


def _sweep(out, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "benchmark_layouts.py"),
                        "--nproc-per-node", "2", *TINY, "--output-dir", str(out), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    return r


def test_two_process_sweep_rows_csv_json_png(tmp_path):
    out = tmp_path / "sweep"
    r = _sweep(out, "--warmup-iters", 1, "--iters", 2,
               "--layouts", "tp2pp1dp1mbs2+sp,tp1pp2dp1mbs1,tp1pp1dp2mbs2+zero,tp1pp2dp1mbs1+vp2")
    assert "[1/3]" in r.stdout and "[3/3]" in r.stdout and "ETA" in r.stdout  # progress
    report = json.loads((out / "layouts.json").read_text())
    rows = {row["layout"]: row for row in report["rows"]}
    ran = ["tp2pp1dp1mbs2+sp+sdpa", "tp1pp2dp1mbs1+sdpa", "tp1pp1dp2mbs2+zero+sdpa"]
    assert set(rows) == set(ran) | {"tp1pp2dp1mbs1+vp2+sdpa"}
    for name in ran:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["iter_time_s"], rel=1e-6)
        assert row["tflops_per_device"] > 0 and row["peak_mem_gib"] > 0 and row["mem_kind"] == "peak RSS"
        assert all(row[k] is not None and row[k] >= 0 for k in STEP_KEYS)
        assert sum(row[k] for k in STEP_KEYS) <= row["iter_time_s"] * 1.5
        assert 0 < row["est_mem_gib"] < row["peak_mem_gib"]  # RSS also holds the Python/torch runtime
    assert rows["tp1pp2dp1mbs1+sdpa"]["est_bubble"] == pytest.approx(1 / 8)  # (p-1)/m, m = 8 micro-batches
    assert rows["tp1pp2dp1mbs1+sdpa"]["time_pipeline_wait_s"] > 0
    assert rows["tp1pp1dp2mbs2+zero+sdpa"]["est_bubble"] == 0
    failed = rows["tp1pp2dp1mbs1+vp2+sdpa"]  # 2 layers cannot make 2 stages x 2 chunks of >= 2 layers
    assert failed["status"] == "invalid" and "--num-layers-per-virtual-pipeline-stage" in failed["reason"]
    assert [row["rank"] for row in report["rows"][:3]] == [1, 2, 3]  # sorted by tokens/s, failures last
    speeds = [row["tokens_per_s"] for row in report["rows"][:3]]
    assert speeds == sorted(speeds, reverse=True)
    with open(out / "layouts.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["layout"] for t in table] == [row["layout"] for row in report["rows"]]
    assert table[-1]["status"] == "invalid" and float(table[0]["tokens_per_s"]) == speeds[0]
    pytest.importorskip("matplotlib")
    png = (out / "layouts.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert all((out / "runs" / name / "metrics.jsonl").exists() for name in ran)


def test_a_run_past_its_timeout_is_a_row_and_the_sweep_goes_on(tmp_path):
    r = _sweep(tmp_path, "--layouts", "tp1pp1dp2mbs1", "--timeout-per-layout", 0.5, "--iters", 1)
    rows = json.loads((tmp_path / "layouts.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["failed"]
    assert all("timed out after 0.5 s" in row["reason"] for row in rows), r.stdout


def test_failure_reason():
    from benchmark_layouts import failure_reason

    assert failure_reason("x\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
                          1).startswith("out of memory: torch.OutOfMemoryError")
    assert failure_reason("...\nerror: --hidden-size (30) must be divisible by --num-attention-heads (4)\n", 2) \
        == "error: --hidden-size (30) must be divisible by --num-attention-heads (4)"
    assert failure_reason("Traceback...\nRuntimeError: boom\n", 1) == "RuntimeError: boom"
    assert failure_reason("", -9) == "exit status -9"


def test_example_script_dry_run_lists_layouts_with_estimates(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, TP="2", PP="2", MBS="4", OUTPUT_DIR=str(tmp_path))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "benchmark_layouts.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run (--list): 24 layout(s) valid at world size 8" in r.stdout
    assert "tp2pp2dp2mbs4+vp2+sp+zero+full+sdpa" in r.stdout and "bubble 0.062" in r.stdout
    assert not os.listdir(tmp_path)  # a listing writes nothing


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with CUDA the script runs the whole GPU suite")
def test_gpu_suite_cpu_smoke_path(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--output-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no CUDA device: running the CPU smoke path" in r.stdout and "Traceback" not in r.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["kernel_correctness"] and all(row["fwd_max_abs_err"] < 1e-6 and row["bwd_max_abs_err"] < 1e-6
                                                for row in result["kernel_correctness"])
    assert [row["requested_backend"] for row in result["training"]] == ["unfused", "fused_softmax", "sdpa"]
    assert all(row["step_time_s"] > 0 and row["est_memory_gib"] > 0 for row in result["training"])
    assert [row["status"] for row in result["layout_sweep"]["rows"]] == ["ok"]
    md = (tmp_path / "gpu_suite.md").read_text()
    for heading in ("## Fused softmax: correctness", "## Training step", "## Layout sweep at world size 1"):
        assert heading in md


def test_peak_table_matches_whole_model_names():
    import torch

    from megatron_lite.training.metrics import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert device_peak_tflops("NVIDIA GH200 480GB", "bf16")[1].startswith("dense bf16/fp16 peak of GH200")
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert device_peak_tflops("NVIDIA RTX A1000", "bf16")[0] is None  # not an A100
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        peak, why = device_peak_tflops("NVIDIA H100 80GB HBM3", "fp32")
        assert peak is None and "--peak-tflops" in why  # fp32 without TF32 has no table peak
        torch.backends.cuda.matmul.allow_tf32 = True
        assert device_peak_tflops("NVIDIA H100 80GB HBM3", "fp32")[0] == 494.7
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
