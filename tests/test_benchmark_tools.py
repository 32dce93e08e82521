"""Each benchmark script (benchmarks/*.py) runs as a user would (subprocess) at a tiny size, prints its
table and writes its JSON. Only that they run and report consistent numbers is checked here: speed
lives in BENCHMARKS.md, not in tests."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _run(script, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r


def test_benchmark_index(tmp_path):
    out = tmp_path / "index.json"
    r = _run("benchmark_index.py", "--num-documents", 2000, "--num-tokens", 400000, "--seq-length", 128,
             "--cache-root", tmp_path, "--output", out)
    assert "build index" in r.stdout
    d = json.loads(out.read_text())
    assert d["built_samples"] >= d["requested_samples"] == (400000 - 1) // 128


def test_benchmark_cpu_step(tmp_path):
    out = tmp_path / "cpu_step.json"
    _run("benchmark_cpu_step.py", "--num-layers", 1, "--hidden-size", 32, "--num-heads", 4, "--seq-length", 16,
         "--vocab-size", 256, "--micro-batch-size", 2, "--warmup", 1, "--iters", 2, "--output", out)
    d = json.loads(out.read_text())
    layouts = [row["layout"] for row in d["rows"]]
    assert layouts == ["TP=1, 1 process", "TP=1, 1 process", "TP=2, 2 processes x 1 thread (gloo)"]
    for row in d["rows"]:
        assert row["ours_step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 16 / row["ours_step_s"])


@pytest.mark.timeout(300)
def test_benchmark_pipeline(tmp_path):
    out = tmp_path / "pipeline.json"
    _run("benchmark_pipeline.py", "--pp", 2, "--multipliers", 1, 2, "--schedules", "1f1b", "--num-layers", 2,
         "--hidden-size", 32, "--num-attention-heads", 4, "--seq-length", 16, "--micro-batch-size", 1,
         "--vocab-size", 128, "--iters", 1, "--warmup-iters", 1, "--output", out)
    d = json.loads(out.read_text())
    assert len(d["results"]) == 2
    bubbles = sorted(r["predicted_bubble_fraction"] for r in d["results"])
    assert bubbles == pytest.approx([0.25, 0.5])  # (p-1)/(m v) for m = 4, 2


def test_benchmark_preprocess(tmp_path, shared_data):
    out = tmp_path / "preprocess.json"
    r = _run("benchmark_preprocess.py", "--data-dir", shared_data, "--limit-mb", 0.3, "--repeats", 1,
             "--work-dir", tmp_path / "work", "--output", out)
    assert r.stdout.count("identical output: True") == 2  # both vocabularies
    d = json.loads(out.read_text())
    assert {(row["vocabulary"], row["impl"], row["workers"]) for row in d["rows"]} == {
        (v, impl, w) for v in ("gpt2", "trained-2048") for impl, w in (("fast", 1), ("fast", 2), ("python", 1))}
    assert all(s["startup_s"] > 0 for s in d["summary"].values())


@pytest.mark.slow  # eight torchrun launches (~40 s); tests/test_data_parallel.py proves the same figures
def test_benchmark_data_parallel(tmp_path):
    out = tmp_path / "dp.json"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark_data_parallel.py", "--num-layers", "2",
                           "--hidden-size", "64", "--num-heads", "4", "--seq-length", "32", "--vocab-size", "512",
                           "--micro-batch-size", "2", "--global-batch-size", "8", "--iters", "2",
                           "--bucket-size", "20000", "--dp-sizes", "1,2", "--precisions", "fp32",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["step_time"]][1:3] == ["--overlap-grad-reduce", "--use-distributed-optimizer"]
    assert all(r["step_s"] > 0 and "bucket(s)" in r["buckets"] for r in report["step_time"])
    mem = {(r["dp"], r["zero1"]): r["optimizer_state_bytes_per_rank"] for r in report["optimizer_memory"]}
    assert mem[(1, False)] == mem[(1, True)] == mem[(2, False)]
    assert abs(mem[(2, True)] - mem[(1, False)] / 2) <= 0.05 * mem[(1, False)]


@pytest.mark.slow  # a dozen training and conversion processes: about a minute
def test_benchmark_checkpoint(tmp_path):
    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark_checkpoint.py", "--num-layers", "2",
                           "--hidden-size", "64", "--num-heads", "4", "--seq-length", "32", "--vocab-size", "512",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and all(r["seconds"] > 0 and r["mib"] > 0 for r in rows)


@pytest.mark.slow  # three kill -9 restarts of a 4-process job
def test_benchmark_restart(tmp_path):
    out = tmp_path / "restart.json"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark_restart.py", "--trials", "1", "--train-iters", "60",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (trial,) = json.loads(out.read_text())["trials"]
    assert 0 <= trial["iterations_lost"] <= 10 and trial["seconds_to_first_resumed_iteration"] > 0
