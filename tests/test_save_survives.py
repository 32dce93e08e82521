"""Saves that survive: kill -9 at any moment of a save leaves the tracker naming a complete
checkpoint; SIGTERM under torchrun (--exit-signal-handler) saves once, exits 0, and resumes exactly."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from dist_helpers import metrics_losses as _losses, run_entry_point
from megatron_lite.parallel.state import free_port

TINY = ["--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--log-interval", "1", "--eval-interval", "100000", "--eval-iters", "0", "--seed", "3"]

# Each kill point: where the saving process dies (SIGKILL, no cleanup) during the save of iteration 4.
KILL_POINTS = {
    "during_shard_write": """
real_save = torch.save
def save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if "iter_0000004" in str(f):
        with open(f, "r+b") as fh:
            fh.truncate(200)  # half a file on disk
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
""",
    "between_shards_and_rename": """
real = ckpt._publish
def publish(staging, final):
    if final.endswith("iter_0000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(staging, final)
ckpt._publish = publish
""",
    "between_rename_and_tracker": """
real = ckpt.atomic_write_text
def write(path, text, **k):
    if path.endswith("latest_checkpointed_iteration.txt") and text == "4":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, text, **k)
ckpt.atomic_write_text = write
""",
    "during_tracker_write": """
import megatron_lite.io_utils as io_utils
real_replace = os.replace
def replace(src, dst):
    if dst.endswith("latest_checkpointed_iteration.txt") and open(src).read() == "4":
        os.kill(os.getpid(), signal.SIGKILL)  # the new tracker is written under its temporary name only
    real_replace(src, dst)
os.replace = replace
""",
}

RUNNER = """
import os, signal, sys, torch
import megatron_lite.training.checkpoint as ckpt
{patch}
from megatron_lite.pretrain_gpt import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(200)
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, point):
    from megatron_lite.training import checkpoint as ckpt

    root = str(tmp_path / "ckpt")
    args = TINY + ["--train-iters", "6", "--save", root, "--save-interval", "2"]
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(patch=KILL_POINTS[point]), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ckpt.read_latest_iteration(root) == 2
    # what the tracker names is complete and loads; no half-written file sits where loads read
    for dirpath, _, files in os.walk(ckpt.checkpoint_dir(root, 2)):
        for f in files:
            assert f.endswith(".pt"), f
            ckpt.read_shard(os.path.join(dirpath, f))
    if os.path.isdir(os.path.join(root, "iter_0000004")):  # renamed in only when complete
        ckpt.read_shard(os.path.join(root, "iter_0000004", "mp_rank_00", "model_optim_rng.pt"))
    if point != "during_shard_write":
        return  # one full resume below is enough: the checks above are what differs between the points
    out = run_entry_point(TINY + ["--train-iters", "4", "--load", root, "--save", root], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"> loaded checkpoint from {root} at iteration 2" in out.stdout
    assert ckpt.read_latest_iteration(root) == 4  # the next save replaces the leftover staging directory
    assert not any(d.endswith(ckpt.STAGING_SUFFIX) for d in os.listdir(root))


@pytest.mark.timeout(300)
def test_sigterm_under_torchrun_saves_once_exits_0_and_resumes_exactly(tmp_path):
    root = str(tmp_path / "ckpt")
    long_run = TINY + ["--train-iters", "100000", "--lr-decay-iters", "1000", "--tensor-model-parallel-size", "2",
                       "--distributed-backend", "gloo"]
    metrics = str(tmp_path / "preempted.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megatron_lite.pretrain_gpt", *long_run, "--save", root, "--exit-signal-handler",
           "--metrics-jsonl", metrics]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 3):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    for pid in workers:  # what Slurm does on preemption: SIGTERM to every task
        os.kill(int(pid), signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert out.count("> saved checkpoint at iteration") == 1, out
    assert "SIGTERM received" in out
    stopped = max(_losses(metrics))
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped)

    until = ["--exit-interval", str(stopped + 3)]
    resumed = run_entry_point(long_run + ["--load", root, "--metrics-jsonl", str(tmp_path / "resumed.jsonl")] + until,
                              tmp_path, nproc=2, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_entry_point(long_run + ["--metrics-jsonl", str(tmp_path / "straight.jsonl")] + until, tmp_path,
                               nproc=2, timeout=120)
    assert straight.returncode == 0, straight.stderr
    a, b = _losses(tmp_path / "resumed.jsonl"), _losses(tmp_path / "straight.jsonl")
    assert sorted(a) == list(range(stopped + 1, stopped + 4))
    assert [a[i] for i in sorted(a)] == [b[i] for i in sorted(a)]  # bit for bit
